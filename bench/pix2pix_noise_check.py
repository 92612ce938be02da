"""Video Instruct-Pix2Pix with one shared x_T against each frame's own x_T (issue 8).

The engine starts every pix2pix frame from frame 1's x_T (as ControlNet video does,
Sect. 3.4); the official code gives each frame its own noise. Both run here on
``builtin:shapes-pix2pix`` with the quality benchmark's moving-shape sources, edits and
figures (``bench.quality.edit_figures``): edit success (edit strength), structure IoU with
the moving source, and colour drift across the video (consistency), same seeds, one process.

    python -m bench.pix2pix_noise_check                  # 16 seeds, 8 frames
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from backend.engine.pipeline import TextToVideoZero
from backend.models.loading import load_base_model

from . import quality as q
from .measure import cpu_name

VARIANTS = {"shared x_T": "shared", "per-frame x_T": "per_frame"}
FIGURES = ("edit_success", "structure_iou", "colour_drift")


def main(argv: list[str] | None = None) -> int:
    """Print one row of figures per initial-noise choice (means over seeds)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.pix2pix_noise_check", description=__doc__
    )
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--model", default="builtin:shapes-pix2pix")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = q.Settings(seeds=args.seeds, control_frames=args.frames)
    engine = TextToVideoZero(load_base_model(args.model, pix2pix=True))
    header = (
        f"command: python -m bench.pix2pix_noise_check {' '.join(argv or sys.argv[1:])}\n"
        f"machine: {cpu_name()}, 1 torch thread; torch {torch.__version__}\n"
        f"model {args.model}, {settings.size}x{settings.size}, {settings.steps} steps, "
        f"guidance {settings.guidance}, image guidance {settings.image_guidance}, "
        f"{args.frames} frames, {args.seeds} seeds (bench.quality sources and edits)"
    )
    print(header, flush=True)
    rows = {}
    for name, initial_noise in VARIANTS.items():
        figures = []
        started = time.perf_counter()
        for seed in range(args.seeds):
            scene, velocity, video = q.moving_source(seed, args.frames, settings.size)
            edit = q.edit_for(seed, scene)
            image = {k: q._tensor(video[k]) for k in range(args.frames)}
            with torch.inference_mode():
                latents = engine(
                    prompt=edit.instruction,
                    num_frames=args.frames,
                    height=settings.size,
                    width=settings.size,
                    num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance,
                    image_guidance_scale=settings.image_guidance,
                    motion_dynamics=False,
                    chunk_size=args.frames,
                    seed=seed,
                    image=image,
                    initial_noise=initial_noise,
                )
                frames = q.decode(engine, latents)
            figures.append(q.edit_figures(frames, video, edit, velocity, settings.size))
        seconds = (time.perf_counter() - started) / args.seeds
        rows[name] = {**q.summarise(figures), "s_per_video": seconds}
        q.progress(f"{name}: {seconds:.1f} s/video")
    q.report_variants(rows, FIGURES, header, args.json, widths=(16, 14))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
