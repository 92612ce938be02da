"""Quality of the engine's pictures on the built-in shapes models, read by bench.shape_metrics.

Every configuration runs through the engine API in ONE process on the same loaded models,
the same seeds and the same prompts, so the figures of a table are side by side:

* fidelity: one image per seed from a random one-shape prompt; the fraction whose dominant
  foreground colour, shape kind and background colour all match the prompt (the world's own
  renders of the same scenes are read too: the analysis's ceiling);
* text2video: 16-frame videos (the 8-frame figures are their first 8 frames: a frame
  depends only on the seed, its index and frame 1, never on the video length), default
  motion and a stronger one, the paper's ablation side by side (full; without cross-frame
  attention; without motion dynamics, i.e. motion 0; without both, i.e. independent
  one-frame runs with their own seeds; with background smoothing);
* ControlNet video on Canny edges of a moving shape, with and without cross-frame attention;
* Video Instruct-Pix2Pix of a moving-shape video against per-frame Pix2Pix.

    .venv/bin/python -m bench.quality --json bench/results/quality-cpu.json \\
        --sheets bench/results/quality
    .venv/bin/python -m bench.quality --quick          # 4 seeds, a smoke run

Not a timed test: it prints a table and writes JSON (and contact sheets with --sheets).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import backend.engine.pipeline as engine_module
from backend.engine.motion import latent_shift
from backend.engine.pipeline import ControlInput, TextToVideoZero
from backend.media.controls import canny
from backend.models import shapes
from backend.models.loading import choose_dtype, load_base_model, load_controlnet, resolve_device
from backend.protocol import resolve_t0_t1

from . import shape_metrics as sm
from .measure import device_name
from .warp_check import legacy_translate

SECTIONS = ("fidelity", "text2video", "controlnet", "pix2pix")
SHAPES_MODELS = ("builtin:shapes", "builtin:shapes-controlnet", "builtin:shapes-pix2pix")
TINY_MODELS = ("builtin:tiny", "builtin:tiny-controlnet", "builtin:tiny-pix2pix")
# Seeds of the scenes (prompts, moving sources) are offset from the generation seeds so the
# two streams never coincide.
SCENE_SEED = 7000
# Moving sources for ControlNet and Pix2Pix: shapes move this many pixels per frame
# (at 64 px), in a random direction.
SOURCE_SPEED_PX = 2.0


@dataclass(frozen=True)
class Settings:
    """What every run of one benchmark shares."""

    size: int = 64  # height = width in pixels (the shapes models' native size)
    steps: int = 10  # DDIM steps (fidelity was the same at 20 in a trial; half the time)
    guidance: float = 7.5
    image_guidance: float = 1.5  # pix2pix
    frames: int = 16  # text2video length; the first 8 frames give the 8-frame figures
    short: int = 8  # the shorter video measured on the same runs
    control_frames: int = 8  # ControlNet and Pix2Pix video length
    motion: float = 12.0  # default motion strength (1/512 of the frame per frame, both axes)
    # The stronger motion: 0.5 latent px per frame at 64x64, so every odd frame's shift sits
    # exactly between two latent pixels, as the default does at 512x512 (1.5 px): the case
    # where a nearest warp that rounds ties duplicates rows.
    strong_motion: float = 32.0
    seeds: int = 32
    rows: tuple[str, ...] = ()  # text2video rows whose name contains one of these (all if empty)


@dataclass(frozen=True)
class Variant:
    """One text2video configuration of the ablation."""

    name: str
    motion: float | None  # None: no motion (strength 0)
    frames: int  # video length run; every shorter measured length is its first frames
    kwargs: dict = field(default_factory=dict)  # engine keywords
    independent: bool = False  # one-frame runs, each frame with its own seed
    legacy_warp: bool = False  # the warp before the fix (bench.warp_check): a control row


LATE_WARP = {"t0": 4, "t1": 5}  # of 10 steps (the default is t0 8, t1 9)


def text2video_variants(settings: Settings) -> list[Variant]:
    """The paper's ablation: full at both motions and both lengths, without cross-frame
    attention at both motions (16 frames at the default one); the baselines (no motion dynamics, independent frames) and background smoothing
    (each schedule the engine offers) at the default motion over the short length."""
    default, strong = settings.motion, settings.strong_motion
    long, short = settings.frames, settings.short
    no_xattn = {"cross_frame_attention": False}
    variants = [
        Variant(f"full m{default:g}", default, long),
        Variant(f"no cross-frame attn m{default:g}", default, long, no_xattn),
        Variant(f"full m{strong:g}", strong, long),
        Variant(f"no cross-frame attn m{strong:g}", strong, short, no_xattn),
        Variant(f"legacy warp m{strong:g} (control)", strong, short, legacy_warp=True),
        # The warp acting on a more formed latent (frame 1 alone for 5 of 10 steps): where a
        # warp that duplicates rows leaves a visible trace.
        Variant(f"full m{strong:g}, t0 4 t1 5", strong, short, LATE_WARP),
        Variant(f"legacy warp m{strong:g}, t0 4 t1 5", strong, short, LATE_WARP, legacy_warp=True),
        Variant("no motion dynamics", None, short),
        Variant("no motion, no cross-frame attn", None, short, no_xattn),
        Variant("independent frames", None, short, independent=True),
        Variant(f"bg smoothing m{default:g}", default, short, {"smooth_bg": True}),
    ]
    if "smooth_schedule" in inspect.signature(TextToVideoZero.__call__).parameters:
        every = {"smooth_bg": True, "smooth_schedule": "every_step"}
        variants.append(Variant(f"bg smoothing every step m{default:g}", default, short, every))
    return variants


# ---------------------------------------------------------------------------- scenes


def scene_for(seed: int) -> shapes.Scene:
    """The one-shape scene (and so the prompt) of a seed."""
    return shapes.random_scene(random.Random(SCENE_SEED + seed), two_shapes=0.0)


def moving_source(seed: int, frames: int, size: int) -> tuple[shapes.Scene, tuple, np.ndarray]:
    """A seed's scene, a velocity (fractions of the frame per frame) and its rendered video."""
    rng = random.Random(SCENE_SEED + 500 + seed)
    scene = scene_for(seed)
    angle = rng.uniform(0, 2 * math.pi)
    speed = SOURCE_SPEED_PX / 64
    velocity = (speed * math.cos(angle), speed * math.sin(angle))
    # Start where the whole path stays inside the frame as far as possible.
    shape = scene.shapes[0]
    travel = (velocity[0] * (frames - 1), velocity[1] * (frames - 1))
    x = min(max(shape.x - travel[0] / 2, shape.size), 1 - shape.size)
    y = min(max(shape.y - travel[1] / 2, shape.size), 1 - shape.size)
    scene = shapes.Scene(
        scene.background,
        scene.texture,
        (shapes.Shape(shape.kind, shape.colour, x, y, shape.size),),
        scene.texture_seed,
    )
    return scene, velocity, shapes.render_video(scene, frames, size, size, velocity=velocity)


def edit_for(seed: int, scene: shapes.Scene) -> shapes.Edit:
    """Even seeds recolour the shape, odd seeds the background, to an unused colour."""
    rng = random.Random(SCENE_SEED + 900 + seed)
    used = {scene.background, scene.shapes[0].colour}
    colour = rng.choice([c for c in shapes.COLOURS if c not in used])
    if seed % 2 == 0:
        return shapes.recolour_shape(scene, scene.shapes[0].kind, colour)
    return shapes.recolour_background(scene, colour)


# ---------------------------------------------------------------------------- generation


def _tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) uint8, as the runner hands frames to the engine."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def decode(engine: TextToVideoZero, latents: torch.Tensor) -> np.ndarray:
    """(frames, H, W, 3) uint8 frames, decoded in slices of 4 as the runner does."""
    return np.concatenate(
        [engine.decode(latents[i : i + 4]).numpy() for i in range(0, len(latents), 4)]
    )


def text2video(
    engine: TextToVideoZero, settings: Settings, variant: Variant, prompt: str, seed: int
) -> np.ndarray:
    """Decoded frames of one text2video configuration."""
    steps = settings.steps
    t0, t1 = resolve_t0_t1(steps)
    common = dict(
        prompt=prompt,
        height=settings.size,
        width=settings.size,
        num_inference_steps=steps,
        guidance_scale=settings.guidance,
        t0=t0,
        t1=t1,
    )
    common.update({k: v for k, v in variant.kwargs.items() if k in ("t0", "t1")})
    kwargs = {k: v for k, v in variant.kwargs.items() if k not in ("t0", "t1")}
    if variant.independent:
        # Without both: every frame its own seed (frame 1 keeps the video's), alone.
        latents = torch.cat(
            [
                engine(num_frames=1, seed=seed if k == 0 else 100_000 + seed * 100 + k, **common)
                for k in range(variant.frames)
            ]
        )
    else:
        motion = variant.motion or 0.0
        with legacy_warp(variant.legacy_warp):
            latents = engine(
                num_frames=variant.frames,
                chunk_size=variant.frames,
                seed=seed,
                motion=(motion, motion),
                **common,
                **kwargs,
            )
    return decode(engine, latents)


@contextmanager
def legacy_warp(active: bool) -> Iterator[None]:
    """While active, the engine warps with the pre-fix warp (nearest at exactly x + s, ties
    to even: duplicated latent rows on half-pixel shifts), to show what the figures see."""
    if not active:
        yield
        return
    fixed = engine_module.translate_latents
    engine_module.translate_latents = legacy_translate
    try:
        yield
    finally:
        engine_module.translate_latents = fixed


def displacements(settings: Settings, motion: float | None, frames: int) -> list:
    """Nominal content displacement of each frame in pixels under the engine's warp.

    The warp reads latent pixel x + k * s (``backend.engine.motion``), so content moves by
    -k * s latent pixels, i.e. -k * s * 8 pixels; frame 1 never moves.
    """
    if not motion:
        return [(0.0, 0.0)] * frames
    factor = 8
    lat = settings.size // factor
    sx, sy = latent_shift((motion, motion), lat, lat)
    return [(-k * sx * factor, -k * sy * factor) for k in range(frames)]


def video_figures(
    frames: np.ndarray,
    shifts: Sequence[tuple[float, float]],
    colour: str | None = None,
    lengths: Sequence[int] | None = None,
) -> dict[int, dict[str, float]]:
    """Per-video figures against frame 1 moved by the motion (see bench.shape_metrics), for
    the first ``length`` frames of each of ``lengths`` (default: the whole video).

    Every frame is compared with frame 1 alone, so the frames are analysed once and each
    length takes its prefix.
    """
    lengths = list(lengths or [len(frames)])
    comparisons = sm.compare_to_first(frames[: max(lengths)], shifts, quantum=8)
    matches = None
    if colour is not None:
        matches = [sm.read_image(f, classify=False).foreground == colour for f in frames]
    out = {}
    for n in lengths:
        part = comparisons[: n - 1]
        residuals = [c.residual for c in part]
        figures = {
            "colour_drift": _nanmean([c.colour_drift for c in part]),
            "shape_iou": _nanmean([c.shape_iou for c in part]),
            "bg_error": _nanmean([c.background_error for c in part]),
            "odd_even": sm.odd_even_ratio(residuals),
            "flicker": sm.flicker(residuals),
            "fg_lost": float(np.mean([math.isnan(c.colour_drift) for c in part])),
        }
        if matches is not None:
            figures["colour_match"] = float(np.mean(matches[:n]))
        out[n] = figures
    return out


def progress(message: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def report_variants(
    rows: dict[str, dict[str, float]],
    figures: Sequence[str],
    header: str,
    json_path: Path | None,
    widths: tuple[int, int] = (16, 14),
) -> None:
    """Print one line per variant (its figures and seconds per video); write the JSON too."""
    name_width, value_width = widths
    columns = " ".join(f"{f:>{value_width}s}" for f in (*figures, "s/video"))
    print(f"\n  {'variant':{name_width}s} " + columns)
    for name, row in rows.items():
        values = [row[f] for f in figures] + [row["s_per_video"]]
        print(f"  {name:{name_width}s} " + " ".join(f"{v:{value_width}.4f}" for v in values))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the values that are not NaN (NaN if none is)."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each figure over seeds (NaNs left out) and the seed count."""
    keys = rows[0].keys()
    out = {k: _nanmean([r[k] for r in rows]) for k in keys}
    out["seeds"] = len(rows)
    return out


# ---------------------------------------------------------------------------- sections


@dataclass
class Outputs:
    """What the sections leave besides their table rows."""

    sheets: dict[str, np.ndarray] = field(default_factory=dict)  # contact sheets (RGB)
    per_seed: dict[str, dict[str, list]] = field(default_factory=dict)  # section -> row -> seeds


@dataclass
class Models:
    """The loaded engines of a benchmark run."""

    base: TextToVideoZero
    controlnet: TextToVideoZero | None
    pix2pix: TextToVideoZero | None
    names: tuple[str, str, str]


def load_models(
    names: Sequence[str],
    sections: Sequence[str],
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Models:
    """Engines for the sections asked for, through the same loading code as user models."""
    base = load_base_model(names[0], dtype=dtype, device=device)
    controlnet = pix2pix = None
    if "controlnet" in sections:
        controlnet = TextToVideoZero(base, [load_controlnet(names[1], dtype=dtype, device=device)])
    if "pix2pix" in sections:
        pix2pix = TextToVideoZero(
            load_base_model(names[2], pix2pix=True, dtype=dtype, device=device)
        )
    return Models(TextToVideoZero(base), controlnet, pix2pix, tuple(names))


def run_fidelity(models: Models, settings: Settings, out: Outputs) -> dict:
    """Prompt fidelity of single images, and of the world's renders of the same scenes."""
    parts = {"colour": [], "shape": [], "background": []}
    truth = []
    images, labels = [], []
    readings: list[dict] = out.per_seed.setdefault("fidelity", {}).setdefault("images", [])
    for seed in range(settings.seeds):
        scene = scene_for(seed)
        latents = models.base(
            prompt=scene.prompt(),
            num_frames=1,
            height=settings.size,
            width=settings.size,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            seed=seed,
            motion_dynamics=False,
        )
        image = decode(models.base, latents)[0]
        reading = sm.read_image(image)
        match = sm.matches_prompt(reading, scene)
        readings.append(
            {
                "prompt": scene.prompt(),
                "read": [reading.foreground, reading.kind, reading.background],
                "kind_iou": reading.kind_iou,
            }
        )
        for key, value in match.items():
            parts[key].append(value)
        rendered = shapes.render(scene, settings.size, settings.size)
        truth.append(all(sm.matches_prompt(sm.read_image(rendered), scene).values()))
        if len(images) < 16:
            images.append(image)
            shape = scene.shapes[0]
            labels.append((f"{shape.colour} {shape.kind}", f"on {scene.background}"))
    everything = [all(v) for v in zip(*parts.values(), strict=True)]
    out.sheets["fidelity"] = captioned_grid(images, labels, columns=8)
    return {
        "fidelity": float(np.mean(everything)),
        **{f"{k}_match": float(np.mean(v)) for k, v in parts.items()},
        "renders_fidelity": float(np.mean(truth)),
        "seeds": settings.seeds,
    }


def run_text2video(models: Models, settings: Settings, out: Outputs) -> list[dict]:
    """The ablation table: one row per variant and video length (and per-seed figures)."""
    rows = []
    per_seed: dict[str, list] = out.per_seed.setdefault("text2video", {})
    sheet_rows = []
    for variant in text2video_variants(settings):
        if settings.rows and not any(r in variant.name for r in settings.rows):
            continue
        lengths = [n for n in (settings.short, settings.frames) if n <= variant.frames]
        per_length: dict[int, list] = {n: [] for n in lengths}
        started = time.perf_counter()
        for seed in range(settings.seeds):
            scene = scene_for(seed)
            frames = text2video(models.base, settings, variant, scene.prompt(), seed)
            shifts = displacements(settings, variant.motion, variant.frames)
            colour = scene.shapes[0].colour
            for length, figures in video_figures(frames, shifts, colour, lengths).items():
                per_length[length].append(figures)
                per_seed.setdefault(f"{variant.name}, {length} frames", []).append(figures)
            if seed == 0:
                sheet_rows.append((variant.name, frames[:: max(1, variant.frames // 8)]))
        seconds = (time.perf_counter() - started) / settings.seeds
        progress(f"text2video {variant.name}: {seconds:.1f} s/video")
        for length, figures in per_length.items():
            rows.append(
                {
                    "variant": variant.name,
                    "frames": length,
                    "motion": variant.motion or 0.0,
                    **summarise(figures),
                    "s_per_video": seconds,
                }
            )
    out.sheets["text2video"] = labelled_rows(sheet_rows)
    return rows


def run_controlnet(models: Models, settings: Settings, out: Outputs) -> list[dict]:
    """ControlNet video on Canny edges of a moving shape, with and without cross-frame attn."""
    rows, sheet_rows = [], []
    engine = models.controlnet
    n = settings.control_frames
    for name, cross in (("controlnet video", True), ("no cross-frame attn", False)):
        figures = []
        started = time.perf_counter()
        for seed in range(settings.seeds):
            scene, velocity, video = moving_source(seed, n, settings.size)
            control = {k: _tensor(canny(video[k])) for k in range(n)}
            latents = engine(
                prompt=scene.prompt(),
                num_frames=n,
                height=settings.size,
                width=settings.size,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                seed=seed,
                chunk_size=n,
                motion_dynamics=False,
                controls=[ControlInput(engine.controlnets[0], control, 1.0)],
                cross_frame_attention=cross,
            )
            frames = decode(engine, latents)
            silhouettes = [
                shapes.silhouette(
                    shapes.moving_scene(scene, k, velocity), settings.size, settings.size
                )
                >= 0.5
                for k in range(n)
            ]
            readings = [sm.read_image(f, classify=False) for f in frames]
            row = video_figures(frames, [(0.0, 0.0)] * n, scene.shapes[0].colour)[n]
            row["silhouette_iou"] = _nanmean(
                [sm.iou(r.mask, s) for r, s in zip(readings, silhouettes, strict=True)]
            )
            row["bg_match"] = float(np.mean([r.background == scene.background for r in readings]))
            figures.append(row)
            if seed == 0:
                if cross:
                    sheet_rows.append(("control (canny)", np.stack([canny(f) for f in video])))
                sheet_rows.append((name, frames))
        seconds = (time.perf_counter() - started) / settings.seeds
        progress(f"controlnet {name}: {seconds:.1f} s/video")
        out.per_seed.setdefault("controlnet", {})[name] = figures
        rows.append({"variant": name, "frames": n, **summarise(figures), "s_per_video": seconds})
    out.sheets["controlnet"] = labelled_rows(sheet_rows)
    return rows


def pix2pix_variants(engine: TextToVideoZero) -> list[tuple[str, dict, bool]]:
    """(name, engine keywords, per-frame runs) of the Pix2Pix comparison; the initial noise
    schedules when the engine offers them (shared x_T is the default)."""
    variants = [
        ("video pix2pix", {}, False),
        ("no cross-frame attn", {"cross_frame_attention": False}, False),
    ]
    if "initial_noise" in inspect.signature(type(engine).__call__).parameters:
        variants.append(("video, per-frame x_T", {"initial_noise": "per_frame"}, False))
    variants.append(("per-frame pix2pix", {}, True))
    return variants


def run_pix2pix(models: Models, settings: Settings, out: Outputs) -> list[dict]:
    """Video Instruct-Pix2Pix of a moving shape against per-frame Pix2Pix."""
    rows, sheet_rows = [], []
    engine = models.pix2pix
    n = settings.control_frames
    for name, kwargs, per_frame in pix2pix_variants(engine):
        figures = []
        started = time.perf_counter()
        for seed in range(settings.seeds):
            scene, velocity, video = moving_source(seed, n, settings.size)
            edit = edit_for(seed, scene)
            common = dict(
                prompt=edit.instruction,
                height=settings.size,
                width=settings.size,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                image_guidance_scale=settings.image_guidance,
                motion_dynamics=False,
                **kwargs,
            )
            if per_frame:
                latents = torch.cat(
                    [
                        engine(
                            num_frames=1,
                            seed=seed if k == 0 else 100_000 + seed * 100 + k,
                            image={0: _tensor(video[k])},
                            **common,
                        )
                        for k in range(n)
                    ]
                )
            else:
                image = {k: _tensor(video[k]) for k in range(n)}
                latents = engine(num_frames=n, chunk_size=n, seed=seed, image=image, **common)
            frames = decode(engine, latents)
            figures.append(edit_figures(frames, video, edit, velocity, settings.size))
            if seed == 0:
                if not sheet_rows:
                    sheet_rows.append((f"source: {edit.instruction}", video))
                sheet_rows.append((name, frames))
        seconds = (time.perf_counter() - started) / settings.seeds
        progress(f"pix2pix {name}: {seconds:.1f} s/video")
        out.per_seed.setdefault("pix2pix", {})[name] = figures
        rows.append({"variant": name, "frames": n, **summarise(figures), "s_per_video": seconds})
    out.sheets["pix2pix"] = labelled_rows(sheet_rows)
    return rows


def edit_figures(
    frames: np.ndarray, source: np.ndarray, edit: shapes.Edit, velocity: tuple, size: int
) -> dict[str, float]:
    """Edit success (instructed colour changed, the rest kept), structure kept, drift."""
    after = edit.after
    readings = [sm.read_image(f, classify=False) for f in frames]
    success = [
        r.foreground == after.shapes[0].colour and r.background == after.background
        for r in readings
    ]
    structure = []
    for k, reading in enumerate(readings):
        truth = shapes.silhouette(shapes.moving_scene(edit.before, k, velocity), size, size) >= 0.5
        structure.append(sm.iou(reading.mask, truth))
    drift = video_figures(frames, [(0.0, 0.0)] * len(frames))[len(frames)]["colour_drift"]
    return {
        "edit_success": float(np.mean(success)),
        "structure_iou": _nanmean(structure),
        "colour_drift": drift,
    }


# ---------------------------------------------------------------------------- sheets


def _text(image: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.33) -> None:
    import cv2

    cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)


def labelled_rows(rows: list[tuple[str, np.ndarray]], label_width: int = 150) -> np.ndarray:
    """A contact sheet: one row of frames per configuration, its name on the left."""
    height = max(frames.shape[1] for _, frames in rows)
    width = max(frames.shape[0] * frames.shape[2] for _, frames in rows)
    sheet = np.full((len(rows) * (height + 2), label_width + width, 3), 255, np.uint8)
    for i, (name, frames) in enumerate(rows):
        top = i * (height + 2)
        strip = np.concatenate(list(frames), axis=1)  # (H, frames * W, 3)
        sheet[top : top + frames.shape[1], label_width : label_width + strip.shape[1]] = strip
        _text(sheet, name[:30], (3, top + height // 2 + 4))
    return sheet


def captioned_grid(images: list[np.ndarray], captions: list[tuple[str, str]], columns: int):
    """Images in a grid, two caption lines under each."""
    h, w = images[0].shape[:2]
    cell_h = h + 24
    rows = math.ceil(len(images) / columns)
    sheet = np.full((rows * cell_h, columns * (w + 4), 3), 255, np.uint8)
    for i, (image, (first, second)) in enumerate(zip(images, captions, strict=True)):
        top, left = (i // columns) * cell_h, (i % columns) * (w + 4)
        sheet[top : top + h, left : left + w] = image
        _text(sheet, first, (left, top + h + 10), 0.28)
        _text(sheet, second, (left, top + h + 21), 0.28)
    return sheet


def write_sheets(sheets: dict[str, np.ndarray], folder: Path) -> list[str]:
    """PNG files of the contact sheets; their paths."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, sheet in sheets.items():
        path = folder / f"{name}.png"
        cv2.imwrite(
            str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9]
        )
        paths.append(str(path))
    return paths


# ---------------------------------------------------------------------------- report

COLUMNS = {
    "text2video": [
        ("variant", "{:<26}"),
        ("frames", "{:>6}"),
        ("colour_drift", "{:>8.2f}"),
        ("shape_iou", "{:>7.3f}"),
        ("bg_error", "{:>7.2f}"),
        ("odd_even", "{:>8.2f}"),
        ("flicker", "{:>7.2f}"),
        ("colour_match", "{:>8.2f}"),
        ("fg_lost", "{:>7.2f}"),
        ("s_per_video", "{:>7.1f}"),
    ],
    "controlnet": [
        ("variant", "{:<26}"),
        ("frames", "{:>6}"),
        ("silhouette_iou", "{:>7.3f}"),
        ("colour_drift", "{:>8.2f}"),
        ("colour_match", "{:>8.2f}"),
        ("bg_match", "{:>8.2f}"),
        ("s_per_video", "{:>7.1f}"),
    ],
    "pix2pix": [
        ("variant", "{:<26}"),
        ("frames", "{:>6}"),
        ("edit_success", "{:>8.2f}"),
        ("structure_iou", "{:>7.3f}"),
        ("colour_drift", "{:>8.2f}"),
        ("s_per_video", "{:>7.1f}"),
    ],
}
HEADERS = {
    "colour_drift": "drift dE",
    "shape_iou": "IoU",
    "bg_error": "bg dE",
    "odd_even": "odd/even",
    "flicker": "flicker",
    "colour_match": "colour ok",
    "fg_lost": "fg lost",
    "s_per_video": "s/video",
    "silhouette_iou": "sil IoU",
    "bg_match": "bg ok",
    "edit_success": "edit ok",
    "structure_iou": "struct",
}


def table(section: str, rows: list[dict]) -> str:
    """The rows of one section as a fixed-width table."""
    columns = COLUMNS[section]
    widths = [len(fmt.format(rows[0][key])) if rows else 8 for key, fmt in columns]
    lines = [
        " ".join(
            HEADERS.get(k, k).rjust(w) if i else HEADERS.get(k, k).ljust(w)
            for i, ((k, _), w) in enumerate(zip(columns, widths, strict=True))
        )
    ]
    for row in rows:
        lines.append(" ".join(fmt.format(row[key]) for key, fmt in columns))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quality", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--seeds", type=int, default=Settings.seeds, help="seeds per configuration")
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--guidance", type=float, default=Settings.guidance)
    parser.add_argument("--quick", action="store_true", help="4 seeds: a smoke run, not figures")
    parser.add_argument(
        "--rows",
        nargs="+",
        default=[],
        help="only the text2video rows whose name contains one of these words",
    )
    parser.add_argument("--tiny", action="store_true", help="builtin:tiny* models (plumbing only)")
    parser.add_argument(
        "--models",
        nargs=3,
        metavar=("BASE", "CONTROLNET", "PIX2PIX"),
        help="other models than the builtin:shapes set (names or folders)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine more threads stall; 0: torch default)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "auto"],
        help="dtype of the models (auto: as a job's dtype auto picks it on the device)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda, mps or auto (the noise is drawn on the CPU, so devices see the same)",
    )
    parser.add_argument("--json", type=Path, help="write settings and figures here")
    parser.add_argument("--sheets", type=Path, help="write contact sheets (PNG) into this folder")
    return parser.parse_args(argv)


RUNNERS: dict[str, Callable] = {
    "fidelity": run_fidelity,
    "text2video": run_text2video,
    "controlnet": run_controlnet,
    "pix2pix": run_pix2pix,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(
        seeds=4 if args.quick else args.seeds,
        steps=args.steps,
        guidance=args.guidance,
        rows=tuple(args.rows),
    )
    names = tuple(args.models) if args.models else TINY_MODELS if args.tiny else SHAPES_MODELS
    started = time.perf_counter()
    device = resolve_device(args.device)
    dtype = choose_dtype(args.dtype, device)
    models = load_models(names, args.sections, dtype.dtype, device)
    command = "python -m bench.quality " + shlex.join(sys.argv[1:] if argv is None else argv)
    header = (
        f"command: {command}\n"
        f"machine: {device_name(device)}, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}, "
        f"python {platform.python_version()}, dtype {dtype.name} ({dtype.reason})\n"
        f"models: {', '.join(names)}; {settings.size}x{settings.size}, {settings.steps} steps, "
        f"guidance {settings.guidance}, {settings.seeds} seeds"
    )
    print(header, flush=True)
    results: dict = {"settings": asdict(settings), "models": list(names), "header": header}
    outputs = Outputs()
    for section in args.sections:
        section_started = time.perf_counter()
        with torch.inference_mode():
            result = RUNNERS[section](models, settings, outputs)
        results[section] = result
        print(f"\n{section} ({time.perf_counter() - section_started:.0f} s)")
        if section == "fidelity":
            print(
                "  "
                + ", ".join(
                    f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in result.items()
                )
            )
        else:
            print(table(section, result))
        sys.stdout.flush()
    results["seconds"] = time.perf_counter() - started
    print(f"\ntotal {results['seconds']:.0f} s")
    results["per_seed"] = outputs.per_seed
    if args.sheets:
        results["sheets"] = write_sheets(outputs.sheets, args.sheets)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=float) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
