"""Peak memory of short and long videos, each measured in a fresh child process.

A process's resident-set high-water mark never goes down and the allocator keeps freed
memory, so every (variant, frame count) runs in its own child: it builds the models, notes
its RSS (CPU) or allocated bytes (CUDA), runs the job once and reports the peak above that
baseline, sampled every few milliseconds (bench/measure.py). The target: our engine's
growth for the longest video within 1.2x of the shortest at the same chunk size.

ControlNet and Pix2Pix read their control / source frames from PNG files inside the
measured run, as the runner does: "ours" spools them and reads each chunk back while
denoising; "ours held" reads them all up front (the runner before) for contrast.

    python -m bench.memory --model sd15 --size 64 --frames 8 64 --chunk-size 4 --steps 2
    python -m bench.memory --model tiny --mode controlnet --size 512 --frames 8 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from backend.models.loading import resolve_device, resolve_dtype

from .measure import MIB, Measurement, measure_once, peak_rss
from .models import MODEL_KINDS, build_models
from .workloads import (
    MODES,
    Workload,
    diffusers_t2vz_variant,
    file_inputs,
    ours_variant,
    write_input_video,
)

TARGET = 1.2
VARIANTS = ("ours", "ours held", "diffusers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", choices=MODEL_KINDS, default="sd15")
    parser.add_argument("--mode", choices=MODES, default="text2video")
    parser.add_argument("--frames", nargs="+", type=int, default=[8, 64])
    parser.add_argument("--size", type=int, default=64, help="height = width in pixels")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=4, help="our engine's chunk size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--no-diffusers",
        action="store_true",
        help="skip diffusers' TextToVideoZeroPipeline (unchunked, for contrast)",
    )
    parser.add_argument(
        "--no-held",
        action="store_true",
        help="controlnet / pix2pix: skip 'ours held' (all input frames read up front)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # JSON spec of one measurement
    return parser.parse_args(argv)


def child(spec: dict) -> dict:
    """Build the models, run one variant once, return its memory and time."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    dtype = resolve_dtype(spec["dtype"], device)
    workload = Workload(**spec["workload"])
    with tempfile.TemporaryDirectory(prefix="t2vz-mem-") as tmp:
        models = build_models(spec["model"], [workload.mode], device, dtype, Path(tmp))
        if spec["variant"] == "diffusers":
            run = diffusers_t2vz_variant(models, workload)
        elif workload.mode == "text2video":
            run = ours_variant(models, workload)
        else:
            video = write_input_video(workload, Path(tmp) / "input")
            streamed = spec["variant"] == "ours"
            run = ours_variant(models, workload, file_inputs(workload, video, streamed))
        result = Measurement()
        measure_once(run, device, result)
    return {
        "growth_mib": result.growth[0] / MIB,
        "peak_mib": result.peak[0] / MIB,
        "process_peak_mib": peak_rss() / MIB if device.type != "cuda" else None,
        "seconds": result.seconds[0],
    }


def spawn(args: argparse.Namespace, variant: str, workload: Workload) -> dict:
    spec = {
        "variant": variant,
        "workload": asdict(workload),
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
    }
    cmd = [sys.executable, "-m", "bench.memory", "--child", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"child {variant} {workload.frames} frames failed:\n{done.stderr[-3000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    print("command: python -m bench.memory " + " ".join(sys.argv[1:] if argv is None else argv))
    from .measure import cpu_name

    print(f"machine: {cpu_name()}; torch {torch.__version__}; each line a fresh child process")
    variants = ["ours"]
    if args.mode == "text2video" and not args.no_diffusers:
        variants.append("diffusers")
    if args.mode != "text2video" and not args.no_held:
        variants.append("ours held")
    rows: dict[tuple[str, int], dict] = {}
    for variant in variants:
        for frames in args.frames:
            chunk = frames if variant == "diffusers" else args.chunk_size
            workload = Workload(args.mode, frames, args.size, args.steps, chunk)
            rows[variant, frames] = spawn(args, variant, workload)
            r = rows[variant, frames]
            print(
                f"  {variant:<10} {frames:4d} frames, chunk {chunk:3d}: growth "
                f"{r['growth_mib']:9.1f} MiB, peak {r['peak_mib']:9.1f} MiB, {r['seconds']:7.1f} s",
                flush=True,
            )
    return report(rows, variants, args.frames)


def report(rows: dict[tuple[str, int], dict], variants: list[str], frames: list[int]) -> int:
    """Print long / short growth ratios; exit status 1 when ours misses the target."""
    short, long = min(frames), max(frames)
    status = 0
    for variant in variants:
        ratio = rows[variant, long]["growth_mib"] / max(rows[variant, short]["growth_mib"], 1e-9)
        verdict = ""
        if variant == "ours":
            verdict = "meets" if ratio <= TARGET else "MISSES"
            verdict = f" ({verdict} the {TARGET}x target)"
            status = 0 if ratio <= TARGET else 1
        print(f"  {variant}: growth {long} frames / {short} frames = {ratio:.2f}{verdict}")
    print("  (process peaks in the lines above include the models)")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
