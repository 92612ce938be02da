"""Which GPU kernels one of our runs spends its time in, attention's SDPA backend above all.

Runs ``ours`` (the engine as the runner drives it, decode included) once untimed, then once
under ``torch.profiler`` and prints the kernels by total device time, marking the attention
ones (flash, memory-efficient or cuDNN SDPA; a plain ``bmm``/``softmax`` pair would mean the
math fallback). CUDA only: on the CPU the profile shows ATen operators, not kernels.

    python -m bench.kernels --model sd15 --device cuda --dtype float16 --size 512 --frames 8
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from backend.models.loading import choose_dtype, resolve_device

from .models import MODEL_KINDS, build_models
from .workloads import MODES, Workload, ours_variant

ATTENTION = re.compile(r"flash|fmha|efficient|cudnn.*(sdpa|attention)|attention", re.IGNORECASE)


def attention_share(rows: list[tuple[str, float, int]]) -> float:
    """Fraction of the device time spent in kernels whose names mark them as attention."""
    total = sum(t for _, t, _ in rows)
    return sum(t for name, t, _ in rows if ATTENTION.search(name)) / total if total else 0.0


def kernel_rows(events: Iterable[Any]) -> list[tuple[str, float, int]]:
    """(kernel name, total device ms, calls), largest first, from a profile's events."""
    rows: dict[str, list[float]] = {}
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        entry = rows.setdefault(event.name, [0.0, 0])
        entry[0] += event.device_time / 1000.0  # µs -> ms
        entry[1] += 1
    return sorted(((n, t, int(c)) for n, (t, c) in rows.items()), key=lambda r: -r[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__)
    parser.add_argument("--model", choices=MODEL_KINDS, default="sd15")
    parser.add_argument("--mode", choices=MODES, default="text2video")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--top", type=int, default=15, help="kernels listed")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type != "cuda":
        parser.error(f"--device must be a CUDA device (kernels are CUDA's), got {args.device}")
    dtype = choose_dtype(args.dtype, device).dtype
    workload = Workload(args.mode, args.frames, args.size, args.steps, args.chunk_size)
    with tempfile.TemporaryDirectory() as work:
        models = build_models(args.model, [args.mode], device, dtype, Path(work))
        run = ours_variant(models, workload)
        with torch.inference_mode():
            run()  # warm-up: kernel selection, allocator growth
            torch.cuda.synchronize(device)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize(device)
    rows = kernel_rows(prof.events())
    total = sum(t for _, t, _ in rows)
    print(
        f"{args.model} {args.mode}: {args.frames} frames, {args.size}x{args.size}, "
        f"{args.steps} steps, chunk {args.chunk_size}, {dtype}, {torch.cuda.get_device_name()}"
    )
    print(f"device time {total:.0f} ms in {sum(c for *_, c in rows)} kernel launches")
    print(f"attention kernels: {100 * attention_share(rows):.1f} % of device time")
    for name, ms, calls in rows[: args.top]:
        mark = "A" if ATTENTION.search(name) else " "
        print(f"{mark} {ms:9.1f} ms {calls:6d}x  {name[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
