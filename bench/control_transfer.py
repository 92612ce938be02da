"""ControlNet video on controls from another renderer than the one the model learnt from.

``builtin:shapes-controlnet`` learnt Canny edges of ``backend.models.shapes`` renders:
upright shapes of half-size 0.14-0.3 of the frame on stripes, checks or noise, and
bench.quality's ControlNet section measures it on that renderer's moving shapes. Here the
same seeds' scenes (shape kind and colour, background colour: the prompt) are also drawn
with OpenCV's drawing functions (anti-aliased polygons and circles at sub-pixel positions),
one difference from the training renderer at a time and all together:

* ``opencv on its bg``: the shape drawn by OpenCV at the training scene's size, place and
  motion (2 px a frame at 64 px) over the training renderer's own background (its
  stripes, checks or noise): the drawing alone differs;
* ``opencv``: the same shape on a flat background of its colour (no texture edges);
* ``+ clutter``: on a background of random lines and ellipses in shades of its colour;
* ``+ sizes``: half-size 0.07-0.12 or 0.32-0.4, outside the training range;
* ``+ motion``: 6 px a frame, squares and triangles turning 6 degrees a frame;
* ``opencv, all``: the three together.

Every row runs the engine as bench.quality's ControlNet section does (same models, seeds,
prompts, steps; one x_T for all frames, cross-frame attention) on ``canny`` of its frames
(what ``--detector canny`` gives), and reads the generated frames with bench.shape_metrics:
``sil IoU`` = foreground against the drawn shape's silhouette, ``colour ok`` / ``bg ok`` =
the frame's shape / background colour is the prompt's. In one run, side by side:

    nice -n 5 .venv/bin/python -m bench.control_transfer --seeds 32
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from backend.engine.pipeline import ControlInput, TextToVideoZero
from backend.media.controls import canny
from backend.models import shapes
from backend.models.loading import load_base_model, load_controlnet

from . import shape_metrics as sm
from .measure import device_name
from .quality import SCENE_SEED, decode, labelled_rows, moving_source

FRAMES, SIZE, STEPS, GUIDANCE = 8, 64, 10, 7.5  # bench.quality's ControlNet settings
SUBPIXEL = 4  # OpenCV's fixed-point bits: positions to 1/16 px
OTHER_SIZES = ((0.07, 0.12), (0.32, 0.4))  # half-sizes outside shapes.SIZE_RANGE
FAST_PX, TURN_DEG = 6.0, 6.0  # "+ motion": px a frame at 64 px, degrees a frame


@dataclass(frozen=True)
class Look:
    """How the OpenCV renderer departs from the training scene."""

    clutter: bool = False
    training_background: bool = False  # the training renderer's background, shape by OpenCV
    other_size: bool = False
    fast: bool = False


ROWS: dict[str, Look | None] = {
    "training renderer": None,
    "opencv on its bg": Look(training_background=True),
    "opencv": Look(),
    "opencv + clutter": Look(clutter=True),
    "opencv + sizes": Look(other_size=True),
    "opencv + motion": Look(fast=True),
    "opencv, all": Look(clutter=True, other_size=True, fast=True),
}


def _fixed(points: np.ndarray) -> np.ndarray:
    """Pixel coordinates (centres at integers) in OpenCV's fixed point."""
    return np.round(points * (1 << SUBPIXEL)).astype(np.int32)


def _outline(kind: str, cx: float, cy: float, half: float, angle: float) -> np.ndarray | None:
    """(n, 2) pixel vertices of a square or triangle turned by ``angle`` (None: a circle);
    the triangle is shapes.py's: apex up, base down, filling its box."""
    if kind == "circle":
        return None
    corners = (
        [(-1, -1), (1, -1), (1, 1), (-1, 1)] if kind == "square" else [(0, -1), (1, 1), (-1, 1)]
    )
    c, s = math.cos(angle), math.sin(angle)
    return np.array(
        [(cx + half * (c * x - s * y), cy + half * (s * x + c * y)) for x, y in corners]
    )


def draw_shape(canvas: np.ndarray, kind: str, centre, half: float, angle: float, colour) -> None:
    """Draw one anti-aliased filled shape into ``canvas`` in place (pixel units)."""
    outline = _outline(kind, centre[0], centre[1], half, angle)
    if outline is None:
        centre_fixed = tuple(int(v) for v in _fixed(np.asarray(centre)))
        radius = int(round(half * (1 << SUBPIXEL)))
        cv2.circle(canvas, centre_fixed, radius, colour, -1, cv2.LINE_AA, SUBPIXEL)
    else:
        cv2.fillPoly(canvas, [_fixed(outline)], colour, cv2.LINE_AA, SUBPIXEL)


def clutter(colour: tuple[int, int, int], rng: random.Random) -> np.ndarray:
    """A static background: its colour with random lines and ellipses in shades of it."""
    base = np.array(colour, np.float32)
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:] = colour
    tones = [tuple(int(v) for v in base * t) for t in (shapes.SHADE, 0.8)]
    tones.append(tuple(int(v) for v in base + (255 - base) * 0.35))
    for _ in range(6):
        centre = (rng.uniform(0, SIZE), rng.uniform(0, SIZE))
        axes = (rng.uniform(3, 14), rng.uniform(3, 14))
        box = (centre, (2 * axes[0], 2 * axes[1]), rng.uniform(0, 180))
        cv2.ellipse(image, box, rng.choice(tones), -1, cv2.LINE_AA)
    for _ in range(10):
        ends = _fixed(np.array([[rng.uniform(-8, SIZE + 8) for _ in range(2)] for _ in range(2)]))
        cv2.line(
            image,
            tuple(ends[0]),
            tuple(ends[1]),
            rng.choice(tones),
            rng.randint(1, 3),
            cv2.LINE_AA,
            SUBPIXEL,
        )
    return image


def opencv_video(seed: int, look: Look) -> tuple[shapes.Scene, np.ndarray, np.ndarray]:
    """The seed's scene drawn by OpenCV as ``look`` says: (scene, frames, silhouettes)."""
    scene, velocity, _ = moving_source(seed, FRAMES, SIZE)
    shape = scene.shapes[0]
    rng = random.Random(SCENE_SEED + 1300 + seed)
    half = shape.size
    if look.other_size:
        half = rng.uniform(*rng.choice(OTHER_SIZES))
    start = np.array([shape.x, shape.y]) * SIZE - 0.5  # pixel centres at integers
    step, turn = np.array(velocity) * SIZE, 0.0
    if look.fast:
        step = step / np.linalg.norm(step) * FAST_PX
        turn = math.radians(TURN_DEG) * rng.choice((-1, 1))
    if look.fast or look.other_size:  # keep the path's middle at the frame's middle
        start = np.full(2, SIZE / 2 - 0.5) - step * (FRAMES - 1) / 2
    background = np.empty((SIZE, SIZE, 3), np.uint8)
    background[:] = shapes.PALETTE[scene.background]
    if look.clutter:
        background = clutter(shapes.PALETTE[scene.background], rng)
    if look.training_background:
        background = shapes.render(replace(scene, shapes=()), SIZE, SIZE)
    frames, silhouettes = [], []
    for k in range(FRAMES):
        centre, angle = start + k * step, k * turn
        frame, mask = background.copy(), np.zeros((SIZE, SIZE), np.uint8)
        draw_shape(frame, shape.kind, centre, half * SIZE, angle, shapes.PALETTE[shape.colour])
        draw_shape(mask, shape.kind, centre, half * SIZE, angle, 255)
        frames.append(frame)
        silhouettes.append(mask >= 128)
    return scene, np.stack(frames), np.stack(silhouettes)


def training_video(seed: int) -> tuple[shapes.Scene, np.ndarray, np.ndarray]:
    """bench.quality's ControlNet scene: (scene, frames, silhouettes) of the shapes renderer."""
    scene, velocity, video = moving_source(seed, FRAMES, SIZE)
    silhouettes = [
        shapes.silhouette(shapes.moving_scene(scene, k, velocity), SIZE, SIZE) >= 0.5
        for k in range(FRAMES)
    ]
    return scene, video, np.stack(silhouettes)


def generate(engine: TextToVideoZero, scene: shapes.Scene, video: np.ndarray, seed: int):
    """Decoded frames of ControlNet video on the Canny edges of ``video``."""
    control = {k: torch.from_numpy(canny(video[k])).permute(2, 0, 1) for k in range(FRAMES)}
    latents = engine(
        prompt=scene.prompt(),
        num_frames=FRAMES,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        seed=seed,
        chunk_size=FRAMES,
        motion_dynamics=False,
        controls=[ControlInput(engine.controlnets[0], control, 1.0)],
    )
    return decode(engine, latents)


def figures(frames: np.ndarray, silhouettes: np.ndarray, scene: shapes.Scene) -> dict[str, float]:
    """Silhouette IoU, shape colour and background colour matches, over the frames."""
    readings = [sm.read_image(f, classify=False) for f in frames]
    ious = [sm.iou(r.mask, s) for r, s in zip(readings, silhouettes, strict=True)]
    return {
        "sil_iou": float(np.nanmean(ious)),
        "colour_ok": float(np.mean([r.foreground == scene.shapes[0].colour for r in readings])),
        "bg_ok": float(np.mean([r.background == scene.background for r in readings])),
    }


def run(engine: TextToVideoZero, seeds: int, sheet: Path | None) -> dict[str, list[dict]]:
    """Per row, per seed figures; a contact sheet of seed 0 (controls and frames) if asked."""
    out: dict[str, list[dict]] = {name: [] for name in ROWS}
    sheet_rows = []
    for name, look in ROWS.items():
        started = time.perf_counter()
        for seed in range(seeds):
            scene, video, silhouettes = (
                training_video(seed) if look is None else opencv_video(seed, look)
            )
            frames = generate(engine, scene, video, seed)
            out[name].append(figures(frames, silhouettes, scene))
            if seed == 0:
                sheet_rows += [
                    (f"{name}: canny", np.stack([canny(f) for f in video])),
                    (name, frames),
                ]
        seconds = (time.perf_counter() - started) / seeds
        print(
            f"[{time.strftime('%H:%M:%S')}] {name}: {seconds:.1f} s/video",
            file=sys.stderr,
            flush=True,
        )
    if sheet is not None:
        sheet.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(sheet), cv2.cvtColor(labelled_rows(sheet_rows), cv2.COLOR_RGB2BGR))
    return out


def table(rows: dict[str, list[dict]]) -> str:
    """Mean of each figure per row, and the silhouette IoU's standard error over seeds."""
    lines = [
        f"{'controls drawn by':<22}{'seeds':>6}{'sil IoU':>9}{'+-':>7}{'colour ok':>10}{'bg ok':>7}"
    ]
    for name, seeds in rows.items():
        iou = np.array([s["sil_iou"] for s in seeds])
        error = iou.std(ddof=1) / math.sqrt(len(iou)) if len(iou) > 1 else math.nan
        colour = np.mean([s["colour_ok"] for s in seeds])
        bg = np.mean([s["bg_ok"] for s in seeds])
        lines.append(
            f"{name:<22}{len(seeds):>6}{iou.mean():>9.3f}{error:>7.3f}{colour:>10.2f}{bg:>7.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads [default: 1]")
    parser.add_argument("--sheet", type=Path, help="write seed 0's controls and frames here (PNG)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    base = load_base_model("builtin:shapes", dtype=torch.float32)
    engine = TextToVideoZero(
        base, [load_controlnet("builtin:shapes-controlnet", dtype=torch.float32)]
    )
    started = time.perf_counter()
    rows = run(engine, args.seeds, args.sheet)
    print(table(rows))
    print(
        f"{FRAMES} frames, {SIZE}x{SIZE}, {STEPS} steps, guidance {GUIDANCE}; "
        f"{time.perf_counter() - started:.0f} s on {device_name(torch.device('cpu'))}, "
        f"{torch.get_num_threads()} torch thread(s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
