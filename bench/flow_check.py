"""Warp error of flow-guided consistency against the paper's, on the built-in shapes models.

The shapes world knows its motion exactly: a shape moves by a known velocity over a static
background. For ControlNet video (Canny edges of the moving shape) and Video Instruct-Pix2Pix
(the moving shape's video) each seed runs three configurations on the same loaded models,
seeds and scenes, side by side in one process:

* ``paper``: cross-frame attention to frame 1 only (Text2Video-Zero);
* ``flow, true motion``: consistency "flow" given the world's exact motion;
* ``flow, estimated``: consistency "flow" with DIS optical flow of the input video.

Warp error is the standard temporal-consistency figure of these papers: the colour
difference between frame k and frame k - 1 warped by the TRUE motion, over pixels visible
in both (away from the shape's edge), as CIE76 Delta E and as pixel MSE (RGB in [0, 1]).
Quality kept: silhouette IoU and colour drift (ControlNet), edit success and structure IoU
(Pix2Pix), as bench.quality measures them.

    .venv/bin/python -m bench.flow_check               # 32 seeds
    .venv/bin/python -m bench.flow_check --seeds 4     # a smoke run
    .venv/bin/python -m bench.flow_check --sheets bench/results/quality   # + contact sheets
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from backend.engine.flow import warp
from backend.engine.pipeline import ControlInput, TextToVideoZero
from backend.media.controls import canny
from backend.media.flow import EstimatedFlows, latent_flow
from backend.models import shapes

from . import quality
from . import shape_metrics as sm
from .measure import cpu_name

# "flow, reversed" is a control row: the true motion with its sign flipped (the flow applied
# the wrong way round), which must not beat the right one.
CONFIGS = ("paper", "flow, true motion", "flow, estimated", "flow, reversed")


def true_flows(
    scene: shapes.Scene, velocity: tuple, frames: int, size: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per frame k >= 1 (index k - 1): the world's backward flow k -> k - 1 and forward flow
    k - 1 -> k, (size, size, 2) pixels, and where frame k is surely visible in k - 1.

    A pixel inside the shape moved with it; a background pixel did not move. Visible: inside
    the shape at k (it was inside at k - 1 too), or background at both; pixels within one
    pixel of either frame's edge of the shape are left out (antialiased, ambiguous).
    """
    step = np.array([velocity[0] * size, velocity[1] * size], dtype=np.float32)
    sils = [
        shapes.silhouette(shapes.moving_scene(scene, k, velocity), size, size)
        for k in range(frames)
    ]
    backward, forward, visible = [], [], []
    for k in range(1, frames):
        now, before = sils[k] >= 0.5, sils[k - 1] >= 0.5
        backward.append(np.where(now[..., None], -step, 0).astype(np.float32))
        forward.append(np.where(before[..., None], step, 0).astype(np.float32))
        edge = ~sm.erode(sils[k] >= 1.0) & ~sm.erode(sils[k] <= 0.0)
        edge |= ~sm.erode(sils[k - 1] >= 1.0) & ~sm.erode(sils[k - 1] <= 0.0)
        visible.append((now | ~before) & ~edge)
    return backward, forward, visible


def warp_errors(
    frames: np.ndarray, backward: list[np.ndarray], visible: list[np.ndarray]
) -> tuple[float, float]:
    """Mean Delta E and pixel MSE between frame k and frame k - 1 warped along ``backward``,
    over ``visible`` pixels, averaged over k."""
    de, mse = [], []
    for k in range(1, len(frames)):
        prev = torch.from_numpy(frames[k - 1]).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
        flow = torch.from_numpy(backward[k - 1]).permute(2, 0, 1)[None]  # (1, 2, H, W)
        warped = warp(prev, flow)[0].permute(1, 2, 0).numpy()  # (H, W, 3) in [0, 255]
        mask = visible[k - 1]
        if not mask.any():
            continue
        now = frames[k].astype(np.float64)
        de.append(float(sm.delta_e(sm.srgb_to_lab(now), sm.srgb_to_lab(warped))[mask].mean()))
        mse.append(float((((now - warped) / 255.0) ** 2).mean(axis=-1)[mask].mean()))
    return float(np.mean(de)), float(np.mean(mse))


def flow_inputs(
    config: str, scene: shapes.Scene, velocity: tuple, video: np.ndarray, latent: int
) -> dict:
    """Engine keywords of a configuration for one moving-shape video."""
    n, size = len(video), video.shape[1]
    if config == "paper":
        return {}
    if config in ("flow, true motion", "flow, reversed"):
        backward, forward, _ = true_flows(scene, velocity, n, size)
        sign = -1 if config == "flow, reversed" else 1
        flow = {
            k: latent_flow(sign * backward[k - 1], sign * forward[k - 1], (latent, latent))
            for k in range(1, n)
        }
    else:
        flow = EstimatedFlows(dict(enumerate(video)), range(n), (latent, latent))
    return {"consistency": "flow", "flow": flow}


def run_mode(
    mode: str,
    engine: TextToVideoZero,
    settings: quality.Settings,
    seeds: int,
    configs: tuple[str, ...] = CONFIGS,
    sheets: dict | None = None,
) -> dict[str, dict[str, float]]:
    """Figures of each configuration over ``seeds`` (ControlNet or Pix2Pix)."""
    n, size = settings.control_frames, settings.size
    latent = size // engine.base.vae_scale_factor
    rows: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    seconds = dict.fromkeys(configs, 0.0)
    for seed in range(seeds):
        scene, velocity, video = quality.moving_source(seed, n, size)
        backward, _, visible = true_flows(scene, velocity, n, size)
        for config in configs:
            started = time.perf_counter()
            extra = flow_inputs(config, scene, velocity, video, latent)
            common = dict(
                num_frames=n,
                height=size,
                width=size,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                seed=seed,
                chunk_size=n,
                motion_dynamics=False,
                **extra,
            )
            if mode == "controlnet":
                control = {k: quality._tensor(canny(video[k])) for k in range(n)}
                latents = engine(
                    prompt=scene.prompt(),
                    controls=[ControlInput(engine.controlnets[0], control, 1.0)],
                    **common,
                )
            else:
                edit = quality.edit_for(seed, scene)
                latents = engine(
                    prompt=edit.instruction,
                    image={k: quality._tensor(video[k]) for k in range(n)},
                    image_guidance_scale=settings.image_guidance,
                    **common,
                )
            frames = quality.decode(engine, latents)
            seconds[config] += time.perf_counter() - started
            de, mse = warp_errors(frames, backward, visible)
            row = {"warp_de": de, "warp_mse": mse}
            row.update(_quality(mode, frames, scene, velocity, video, seed, size))
            rows[config].append(row)
            if sheets is not None and seed == 0:
                sheets.setdefault(mode, []).append((config, frames))
        quality.progress(f"{mode} seed {seed + 1}/{seeds}")
    return {c: {**quality.summarise(rows[c]), "s_per_video": seconds[c] / seeds} for c in configs}


def _quality(
    mode: str,
    frames: np.ndarray,
    scene: shapes.Scene,
    velocity: tuple,
    video: np.ndarray,
    seed: int,
    size: int,
) -> dict[str, float]:
    """The quality figures bench.quality reports for the mode."""
    if mode == "pix2pix":
        return quality.edit_figures(frames, video, quality.edit_for(seed, scene), velocity, size)
    truth = [
        shapes.silhouette(shapes.moving_scene(scene, k, velocity), size, size) >= 0.5
        for k in range(len(frames))
    ]
    readings = [sm.read_image(f, classify=False) for f in frames]
    drift = quality.video_figures(frames, [(0.0, 0.0)] * len(frames))[len(frames)]
    return {
        "silhouette_iou": quality._nanmean(
            [sm.iou(r.mask, s) for r, s in zip(readings, truth, strict=True)]
        ),
        "colour_drift": drift["colour_drift"],
    }


FIGURES: dict[str, tuple[str, ...]] = {
    "controlnet": ("warp_de", "warp_mse", "silhouette_iou", "colour_drift"),
    "pix2pix": ("warp_de", "warp_mse", "edit_success", "structure_iou"),
}


def report(mode: str, rows: dict[str, dict[str, float]], emit: Callable[[str], None]) -> None:
    """One line per configuration, and the warp error ratio flow / paper."""
    figures = FIGURES[mode]
    emit(f"\n{mode} ({int(rows['paper']['seeds'])} seeds)")
    emit(f"  {'configuration':20s} " + " ".join(f"{f:>14s}" for f in (*figures, "s/video")))
    for name, row in rows.items():
        values = [row[f] for f in figures] + [row["s_per_video"]]
        emit(f"  {name:20s} " + " ".join(f"{v:14.4f}" for v in values))
    paper = rows["paper"]
    for name, row in rows.items():
        if name != "paper":
            emit(
                f"  {name} / paper: warp Delta E x{row['warp_de'] / paper['warp_de']:.3f}, "
                f"warp MSE x{row['warp_mse'] / paper['warp_mse']:.3f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=["controlnet", "pix2pix"])
    parser.add_argument("--steps", type=int, default=quality.Settings.steps)
    parser.add_argument("--sheets", type=Path, help="folder for contact sheets (seed 0)")
    args = parser.parse_args(argv)
    settings = quality.Settings(steps=args.steps)
    torch.manual_seed(0)
    models = quality.load_models(quality.SHAPES_MODELS, args.modes)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; {settings.steps} steps")
    sheets: dict[str, list] = {}
    for mode in args.modes:
        engine = models.controlnet if mode == "controlnet" else models.pix2pix
        report(mode, run_mode(mode, engine, settings, args.seeds, sheets=sheets), print)
    if args.sheets:
        images = {f"flow-{m}": quality.labelled_rows(rows) for m, rows in sheets.items()}
        for path in quality.write_sheets(images, args.sheets):
            print(f"sheet: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
