"""Odd/even check of the motion warp: lag-1 spatial autocorrelation of each frame's x_t1.

A warp that samples on ties (nearest, half to even) doubles pixels into 2x2 blocks on every
other frame, so those frames' x_t1 is spatially correlated and the others are not. This
runs a text2video job on the builtin tiny random-weight model up to the DDPM jump (the
joint phase does not matter here), once with the engine's warp and once with the old one
that sampled at exactly x + s, in one process, and prints both rows side by side.

    python -m bench.warp_check                       # 16 frames, 512x512, default motion
    python -m bench.warp_check --size 768 768 --frames 16
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import backend.engine.pipeline as engine_module
from backend.engine.pipeline import TextToVideoZero
from backend.models.loading import load_base_model
from backend.models.tiny import build_tiny
from backend.protocol import DEFAULT_MOTION, resolve_t0_t1

from .run import machine


class _Captured(Exception):
    """Raised by the spy once x_t1 is known: the rest of the job is not needed."""


def lag1_autocorrelation(latent: torch.Tensor) -> float:
    """Mean of the horizontal and vertical lag-1 correlation of a (channels, h, w) latent."""
    x = latent.double() - latent.double().mean(dim=(1, 2), keepdim=True)

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a * b).sum() / ((a * a).sum() * (b * b).sum()).sqrt())

    return 0.5 * (corr(x[:, :, :-1], x[:, :, 1:]) + corr(x[:, :-1, :], x[:, 1:, :]))


def legacy_translate(latents: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """The warp before the fix: nearest sampling at exactly x + s (ties round half to even)."""
    frames, _, h, w = latents.shape
    ys = torch.arange(h, dtype=torch.float32, device=latents.device)
    xs = torch.arange(w, dtype=torch.float32, device=latents.device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
    shifts = shifts.to(latents.device).float()
    sample_x = grid_x[None] + shifts[:, 0, None, None]  # (frames, h, w)
    sample_y = grid_y[None] + shifts[:, 1, None, None]
    grid = torch.stack(((sample_x + 0.5) / w * 2 - 1, (sample_y + 0.5) / h * 2 - 1), dim=-1)
    # (frames, h, w, 2)
    return F.grid_sample(
        latents.float(), grid, mode="nearest", padding_mode="reflection", align_corners=False
    ).to(latents.dtype)


def x_t1_frames(
    engine: TextToVideoZero,
    translate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    frames: int,
    width: int,
    height: int,
    steps: int,
    seed: int,
    motion: tuple[float, float],
) -> torch.Tensor:
    """(frames - 1, 4, h, w) x_t1 of frames 2..m, with ``translate`` as the engine's warp."""
    captured: list[torch.Tensor] = []
    real_jump, real_translate = engine_module.ddpm_jump, engine_module.translate_latents

    def spy_jump(x, a0, a1, noise):
        captured.append(real_jump(x, a0, a1, noise))
        raise _Captured

    engine_module.ddpm_jump, engine_module.translate_latents = spy_jump, translate
    t0, t1 = resolve_t0_t1(steps)
    try:
        engine(
            prompt="a horse galloping on a street",
            num_frames=frames,
            height=height,
            width=width,
            num_inference_steps=steps,
            seed=seed,
            motion=motion,
            t0=t0,
            t1=t1,
        )
    except _Captured:
        pass
    finally:
        engine_module.ddpm_jump, engine_module.translate_latents = real_jump, real_translate
    return captured[0]


def main(argv: list[str] | None = None) -> int:
    """Print the lag-1 autocorrelation of every frame's x_t1, old warp and ours."""
    parser = argparse.ArgumentParser(prog="python -m bench.warp_check", description=__doc__)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("W", "H"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--motion", type=float, nargs=2, default=DEFAULT_MOTION)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    width, height = args.size
    with tempfile.TemporaryDirectory() as tmp:
        engine = TextToVideoZero(load_base_model(str(build_tiny("tiny", Path(tmp) / "tiny"))))
        rows = {
            name: x_t1_frames(
                engine, warp, args.frames, width, height, args.steps, args.seed, args.motion
            )
            for name, warp in (
                ("x + s (before)", legacy_translate),
                ("official (now)", engine_module.translate_latents),
            )
        }
    print(f"machine: {machine(torch.device('cpu'), torch.float32)}")
    print(
        f"text2video, builtin tiny (random weights), {args.frames} frames, {width}x{height}, "
        f"{args.steps} steps, motion {args.motion[0]:g} {args.motion[1]:g}, seed {args.seed}"
    )
    print("lag-1 spatial autocorrelation of x_t1, frames 2..m:")
    for name, latents in rows.items():
        values = [lag1_autocorrelation(x) for x in latents]
        odd = [v for k, v in enumerate(values, start=1) if k % 2]  # frames 2, 4, ... (k odd)
        even = [v for k, v in enumerate(values, start=1) if not k % 2]
        print(f"  {name:16s} " + " ".join(f"{v:5.2f}" for v in values))
        print(
            f"  {'':16s} mean over frames 2,4,..: {sum(odd) / len(odd):.3f}; "
            f"frames 3,5,..: {sum(even) / max(1, len(even)):.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
