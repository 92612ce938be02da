"""Background smoothing schedules side by side on the shapes model (issue 8, Sect. 3.3.3).

Runs text2video on ``builtin:shapes`` with the quality benchmark's scenes, settings and
figures (``bench.quality``): no smoothing, the paper's schedule (one blend at x_t1 after a
first pass for the masks, frame 1's warped foreground kept out; the engine's default) and
the older blend after every joint step, for the same seeds in one process. Besides the
quality figures it reads foreground ghosting: the share of a frame's foreground pixels
outside its largest blob (a second copy of the shape pasted from frame 1 shows up there).

    python -m bench.smoothing_check                   # 32 seeds, 8 frames, motion 12
    python -m bench.smoothing_check --seeds 8 --json bench/results/smoothing-cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from backend.engine.pipeline import TextToVideoZero
from backend.models.loading import load_base_model

from . import quality as q
from . import shape_metrics as sm

VARIANTS = {
    "no smoothing": {},
    "smoothing once (paper)": {"smooth_bg": True, "smooth_schedule": "once"},
    "smoothing every step": {"smooth_bg": True, "smooth_schedule": "every_step"},
}
FIGURES = ("bg_error", "ghosting", "colour_drift", "shape_iou", "flicker", "fg_lost")


def ghosting(frames: np.ndarray) -> float:
    """Mean over frames 2..m of the foreground share outside the frame's largest blob."""
    shares = []
    for frame in frames[1:]:
        mask = sm.read_image(frame, classify=False).mask
        total = int(mask.sum())
        if total:
            shares.append(1.0 - int(sm.largest_blob(mask).sum()) / total)
    return float(np.mean(shares)) if shares else float("nan")


def main(argv: list[str] | None = None) -> int:
    """Print one row of figures per schedule (means over seeds)."""
    parser = argparse.ArgumentParser(prog="python -m bench.smoothing_check", description=__doc__)
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--motion", type=float, default=12.0)
    parser.add_argument("--model", default="builtin:shapes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = q.Settings(seeds=args.seeds, frames=args.frames, short=args.frames)
    engine = TextToVideoZero(load_base_model(args.model))
    header = (
        f"command: python -m bench.smoothing_check {' '.join(argv or sys.argv[1:])}\n"
        f"machine: {q.cpu_name()}, 1 torch thread; torch {torch.__version__}\n"
        f"model {args.model}, {settings.size}x{settings.size}, {settings.steps} steps, "
        f"guidance {settings.guidance}, {args.frames} frames, motion {args.motion:g}, "
        f"{args.seeds} seeds (bench.quality scenes)"
    )
    print(header, flush=True)
    rows = {}
    for name, kwargs in VARIANTS.items():
        variant = q.Variant(name, args.motion, args.frames, kwargs)
        figures = []
        started = time.perf_counter()
        for seed in range(args.seeds):
            scene = q.scene_for(seed)
            with torch.inference_mode():
                frames = q.text2video(engine, settings, variant, scene.prompt(), seed)
            shifts = q.displacements(settings, args.motion, args.frames)
            colour = scene.shapes[0].colour
            video = q.video_figures(frames, shifts, colour)[args.frames]
            figures.append({**video, "ghosting": ghosting(frames)})
        seconds = (time.perf_counter() - started) / args.seeds
        rows[name] = {**q.summarise(figures), "s_per_video": seconds}
        q.progress(f"{name}: {seconds:.1f} s/video")
    q.report_variants(rows, FIGURES, header, args.json, widths=(24, 12))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
