"""Does the install demo's circle follow the camera pan? Shape IoU per seed, two warp times.

The README's demo (``install_deps.SHAPES_DEMO``) warps after half the steps; the paper's
default warps after one step of twenty on this model. For seeds 0..n-1 this prints the mean
shape IoU of frames 2..8 against frame 1 moved by the pan (``shape_metrics.compare_to_first``
on the 8 px latent grid), for both, side by side:

.venv/bin/python -m bench.demo_pan --seeds 8
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

import cv2
import numpy as np

from bench import shape_metrics as sm
from bench.quality import Settings, displacements


def demo_flag(args: list[str], flag: str) -> str:
    """The value after ``flag`` in a CLI argument list."""
    return args[args.index(flag) + 1]


def pan_ious(frames: np.ndarray, motion: float) -> list[float]:
    """Shape IoU of frames 2..m against frame 1 moved by the pan; frames (m, H, W, 3) RGB."""
    shifts = displacements(Settings(size=frames.shape[1]), motion, len(frames))
    return [c.shape_iou for c in sm.compare_to_first(frames, shifts, quantum=8)]


def read_frames(folder: Path) -> np.ndarray:
    """(m, H, W, 3) uint8 RGB frames of a result folder."""
    paths = sorted(folder.glob("frame_*.png"))
    return np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths])


def without(args: list[str], *flags: str) -> list[str]:
    """``args`` with each of ``flags`` and its value removed."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    import install_deps
    from backend.service.cli import main as backend_main

    parser = argparse.ArgumentParser(prog="python -m bench.demo_pan", description=__doc__)
    parser.add_argument("--seeds", type=int, default=8, help="seeds 0..n-1")
    args = parser.parse_args(argv)
    demo = without(install_deps.SHAPES_DEMO, "--seed")
    motion = float(demo_flag(demo, "--motion"))
    variants = {"paper default t0/t1": without(demo, "--t0", "--t1"), "the demo's": demo}
    with tempfile.TemporaryDirectory() as tmp:
        for name, job in variants.items():
            means = []
            for seed in range(args.seeds):
                out = Path(tmp) / f"{len(job)}-{seed}"
                cli = ["generate", *job, "--frames", "8", "--no-mp4", "--seed", str(seed)]
                quiet = io.StringIO()
                with contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
                    status = backend_main([*cli, "--out", str(out)])
                if status != 0:
                    raise SystemExit(f"the demo failed at seed {seed}:\n{quiet.getvalue()}")
                means.append(float(np.nanmean(pan_ious(read_frames(out), motion))))
            per_seed = " ".join(f"{m:.2f}" for m in means)
            print(f"{name:20s} mean IoU {np.mean(means):.3f}   per seed {per_seed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
