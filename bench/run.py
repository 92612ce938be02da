"""Time our modes against their floor, plain SD and diffusers' Text2Video-Zero in ONE process.

For every frame count and mode: ours and the floor at each chunk size, plain SD of the same
number of images, and (text2video) diffusers' TextToVideoZeroPipeline unchunked and chunked
by its frame_ids recipe. All variants get a warm-up, then ``--repeats`` interleaved rounds
(the order rotates each round); the median is reported with ratios and peak memory.

    python -m bench.run --model tiny
    python -m bench.run --model sd15 --size 128 --frames 4 --steps 4 --chunk-size 2
    python -m bench.run --model sd15 --device cuda --dtype float16 --size 512 \\
        --frames 8 64 --steps 50 --chunk-size 8

``--compile`` adds our engine with a compiled UNet / ControlNet ("compiled cN" rows, timed
warm, beside eager and the floor) and, before any warm-up, a compile report: the first job
(compile included) and the second job of the same shape, and the graphs compiled by jobs of
``--compile-frames`` frames run one after the other in the same process:

    python -m bench.run --model sd15 --device cuda --dtype float16 --size 512 --frames 8 \\
        --steps 50 --chunk-size 8 --modes text2video --compile --compile-frames 8 16 64
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from backend.engine.compile import CompileOptions, CompileReport, CompileWatch
from backend.models.loading import TORCH_DTYPES, ModelCache, choose_dtype, resolve_device

from .measure import Measurement, device_name, interleaved, synchronize, warm_up
from .models import MODEL_KINDS, BenchModels, build_models
from .workloads import (
    MODES,
    Workload,
    diffusers_t2vz_available,
    diffusers_t2vz_variant,
    floor_variant,
    ours_variant,
    plain_sd_variant,
    text_encoding_variant,
)

WARM_UP_STEPS = 2  # warm-up runs use every call shape of the real run, with fewer steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", choices=MODEL_KINDS, default="tiny")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--frames", nargs="+", type=int, default=[8])
    parser.add_argument("--size", type=int, default=64, help="height = width in pixels")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=4,
        help="chunked runs use this many frames per call (unchunked runs are always made)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"]
    )
    parser.add_argument(
        "--reference-dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="dtype of diffusers' pipeline (its default: float32) and of the 'floor fp32' rows, "
        "made when ours runs in another dtype",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--no-diffusers", action="store_true", help="skip TextToVideoZeroPipeline")
    parser.add_argument("--no-plain", action="store_true", help="skip plain Stable Diffusion")
    parser.add_argument("--json", type=Path, help="also write all measurements here")
    parser.add_argument(
        "--compile", action="store_true", help="add the compiled engine and a compile report"
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (aot_eager: tracing and guards without code generation)",
    )
    parser.add_argument(
        "--compile-frames",
        nargs="+",
        type=int,
        default=[8, 16, 64],
        help="frame counts of the jobs whose compiles the report counts",
    )
    return parser.parse_args(argv)


def machine(device: torch.device, dtype: torch.dtype) -> str:
    """One line describing where the numbers come from."""
    where = device_name(device)
    if device.type != "cuda":
        where += f", {torch.get_num_threads()} torch threads"
    return (
        f"{where}; torch {torch.__version__}, dtype {str(dtype).replace('torch.', '')}, "
        f"python {platform.python_version()}"
    )


def chunk_sizes(frames: int, chunk_size: int) -> list[int]:
    """Unchunked (the whole video in one call per step), and chunked when that is smaller."""
    return [frames] + ([chunk_size] if chunk_size < frames else [])


def variants_for(
    models: BenchModels,
    workload: Workload,
    args: argparse.Namespace,
    reference: BenchModels | None = None,
) -> dict[str, Callable[[], object]]:
    """Every variant of one mode and frame count, keyed by a short label.

    ``reference``: the same models in the reference dtype (float32) when ours runs in
    another (bf16 on CPUs with native bf16): diffusers' pipeline runs on them, in its
    default fp32, and a "floor fp32" row is added.
    """
    out: dict[str, Callable[[], object]] = {}
    for c in chunk_sizes(workload.frames, args.chunk_size):
        w = replace(workload, chunk_size=c)
        out[f"ours c{c}"] = ours_variant(models, w)
        if args.compile:
            out[f"compiled c{c}"] = ours_variant(models, w, compile_options=compile_options(args))
        out[f"floor c{c}"] = floor_variant(models, w)
        if reference is not None:
            out[f"floor fp32 c{c}"] = floor_variant(reference, w)
    out["text encoding"] = text_encoding_variant(models, workload)
    if not args.no_plain:
        out["plain SD"] = plain_sd_variant(models, workload)
    if workload.mode == "text2video" and not args.no_diffusers and diffusers_t2vz_available():
        for c in chunk_sizes(workload.frames, args.chunk_size):
            if c >= 2:
                out[f"diffusers c{c}"] = diffusers_t2vz_variant(
                    reference or models, replace(workload, chunk_size=c)
                )
    return out


def ratio_lines(results: dict[str, Measurement], frames: int, chunk: int) -> list[str]:
    """Ours / floor, ours / plain SD and diffusers / ours, where both sides were measured."""
    lines = []

    def add(label: str, num: str, den: str) -> None:
        if num in results and den in results:
            lines.append(f"  {label:<42} {results[num].median / results[den].median:6.3f}")

    for c in chunk_sizes(frames, chunk):
        add(f"ours / floor (chunk {c})", f"ours c{c}", f"floor c{c}")
        add(f"compiled / ours (chunk {c})", f"compiled c{c}", f"ours c{c}")
        add(f"compiled / floor (chunk {c})", f"compiled c{c}", f"floor c{c}")
    text = results.get("text encoding")
    for c in chunk_sizes(frames, chunk):
        if text is not None and f"ours c{c}" in results:
            rest = results[f"ours c{c}"].median - text.median
            lines.append(
                f"  {f'(ours - text encoding) / floor (chunk {c})':<42} "
                f"{rest / results[f'floor c{c}'].median:6.3f}"
            )
    add(f"ours / plain SD (chunk {frames})", f"ours c{frames}", "plain SD")
    for c in chunk_sizes(frames, chunk):
        add(f"diffusers / ours (chunk {c})", f"diffusers c{c}", f"ours c{c}")
    for c in chunk_sizes(frames, chunk):
        add(f"ours / diffusers (chunk {c})", f"ours c{c}", f"diffusers c{c}")
        add(f"ours / floor fp32 (chunk {c})", f"ours c{c}", f"floor fp32 c{c}")
    return lines


def table(results: dict[str, Measurement], frames: int) -> list[str]:
    mem = "RSS growth" if not torch.cuda.is_available() else "peak alloc"
    lines = [f"  {'variant':<16} {'median s':>9} {'s/frame':>8} {'min s':>8} {mem + ' MiB':>15}"]
    for name, m in results.items():
        lines.append(
            f"  {name:<16} {m.median:9.3f} {m.median / frames:8.3f} {min(m.seconds):8.3f} "
            f"{m.max_growth_mib:15.1f}"
        )
    return lines


def cache_check(models: BenchModels, device: torch.device, dtype: torch.dtype) -> str | None:
    """Second job in a worker: the base model comes from ModelCache without a reload."""
    folder = models.folders.get("base")
    if folder is None:
        return None
    cache = ModelCache()
    started = time.perf_counter()
    cache.base(str(folder), device=device, dtype=dtype)
    first = time.perf_counter() - started
    started = time.perf_counter()
    cache.base(str(folder), device=device, dtype=dtype)
    second = time.perf_counter() - started
    return f"model cache: first job loads in {first:.3f} s, second job {second * 1e3:.3f} ms (loads={cache.loads})"


def compile_options(args: argparse.Namespace) -> CompileOptions:
    """The compile the "compiled" rows and the compile report use."""
    return CompileOptions(backend=args.compile_backend)


def compile_report(
    models: BenchModels, workload: Workload, args: argparse.Namespace, device: torch.device
) -> list[str]:
    """First and second job of a fresh process, then the graphs compiled per frame count."""
    torch._dynamo.reset()
    options = compile_options(args)

    def job(frames: int) -> tuple[float, CompileReport]:
        report = CompileReport(requested=True)
        run = ours_variant(models, replace(workload, frames=frames), compile_options=options)
        with CompileWatch(report):
            started = time.perf_counter()
            run()
            synchronize(device)
            return time.perf_counter() - started, report

    lines = [f"  compile report ({args.compile_backend}, chunk {workload.chunk_size}):"]
    for label in ("first job", "second job"):
        seconds, report = job(workload.frames)
        lines.append(
            f"  {label + f' ({workload.frames} frames)':<26} {seconds:9.3f} s, of it compiling "
            f"{report.compile_seconds:.3f} s; {report.compiles} graphs"
        )
    for frames in args.compile_frames:
        seconds, report = job(frames)
        reasons = "; ".join(report.reasons) or "-"
        lines.append(
            f"  {f'then {frames} frames':<26} {seconds:9.3f} s, {report.compiles} graphs "
            f"compiled ({report.recompiles} recompiles: {reasons})"
        )
    return lines


def run_mode(
    models: BenchModels,
    workload: Workload,
    args: argparse.Namespace,
    device: torch.device,
    reference: BenchModels | None = None,
) -> dict[str, Measurement]:
    variants = variants_for(models, workload, args, reference)
    short = replace(workload, steps=min(WARM_UP_STEPS, workload.steps))
    warm = variants_for(models, short, args, reference)
    warm_up(warm, device)
    return interleaved(variants, args.repeats, device, log=lambda s: print(s, file=sys.stderr))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    choice = choose_dtype(args.dtype, device)
    dtype = choice.dtype
    reference_dtype = TORCH_DTYPES[args.reference_dtype]
    print("command: python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv))
    print("machine:", machine(device, dtype))
    print(f"ours' dtype: {choice.name} ({choice.reason})")
    report: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="t2vz-bench-") as tmp:
        started = time.perf_counter()
        models = build_models(args.model, args.modes, device, dtype, Path(tmp))
        reference = None
        if reference_dtype != dtype:  # diffusers and the fp32 floor run on their own copy
            reference = build_models(
                args.model, args.modes, device, reference_dtype, Path(tmp) / "reference"
            )
            print(f"reference models for diffusers and the floor: {args.reference_dtype}")
        print(f"models: {args.model}, built in {time.perf_counter() - started:.1f} s")
        line = cache_check(models, device, dtype)
        if line:
            print(line)
        for frames in args.frames:
            for mode in args.modes:
                workload = Workload(mode, frames, args.size, args.steps, frames, args.seed)
                compiled = []
                if args.compile:  # before any warm-up: the first job pays the compile
                    chunked = replace(workload, chunk_size=min(args.chunk_size, frames))
                    compiled = compile_report(models, chunked, args, device)
                results = run_mode(models, workload, args, device, reference)
                print(f"\n{mode}: {frames} frames, {args.size}x{args.size}, {args.steps} steps")
                if compiled:
                    print("\n".join(compiled))
                print(
                    "\n".join(
                        table(results, frames) + ratio_lines(results, frames, args.chunk_size)
                    )
                )
                sys.stdout.flush()
                report.append(
                    {
                        "workload": asdict(workload),
                        "results": {k: asdict(v) for k, v in results.items()},
                    }
                )
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": report}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
