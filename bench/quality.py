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
* Video Instruct-Pix2Pix of a moving-shape video against per-frame Pix2Pix;
* flow: flow-guided consistency (``consistency="flow"``) against the paper's, on the
  ControlNet and Pix2Pix scenes, whose true motion is known exactly: the paper; flow given
  the true motion; flow estimated from the frames (and with --flow-reversed a control row,
  the true motion reversed). Warp error (frame k against frame k - 1 warped by the true
  motion, over pixels visible in both) in Delta E and pixel MSE as a ratio to the paper's,
  and the quality figures of the two sections above as paired differences from the paper's.

    .venv/bin/python -m bench.quality --json bench/results/quality-cpu.json \\
        --sheets bench/results/quality
    .venv/bin/python -m bench.quality --quick          # 4 seeds, a smoke run
    .venv/bin/python -m bench.quality --sections flow --flow-modes pix2pix --seeds 8

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
from backend.engine.flow import FlowFusion, FrameFusion
from backend.engine.flow import warp as flow_warp
from backend.engine.motion import latent_shift
from backend.engine.pipeline import ControlInput, TextToVideoZero
from backend.media.controls import canny
from backend.media.flow import EstimatedFlows, GivenFlows
from backend.models import shapes
from backend.models.loading import choose_dtype, load_base_model, load_controlnet, resolve_device
from backend.protocol import resolve_t0_t1

from . import shape_metrics as sm
from .measure import device_name
from .warp_check import legacy_translate

SECTIONS = ("fidelity", "text2video", "controlnet", "pix2pix", "flow")
FLOW_MODES = ("controlnet", "pix2pix")  # the flow section's modes (engines)
# A run without --sections runs them all, flow included: its 32 seeds are 192 videos of
# ~0.5-1 s each on a 2-core EPYC at 1 thread (bench/results/quality-flow-cpu.txt), about
# 3 minutes, a fraction of the text2video section.
DEFAULT_SECTIONS = SECTIONS
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
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1 (held-out runs: >= 1000)
    rows: tuple[str, ...] = ()  # text2video rows whose name contains one of these (all if empty)
    flow_modes: tuple[str, ...] = FLOW_MODES  # the flow section's modes
    flow_reversed: bool = False  # the flow section's control row (the true motion reversed)
    sheet_seeds: int = 2  # seeds whose videos the flow section's contact sheets show


@dataclass(frozen=True)
class Variant:
    """One text2video configuration of the ablation."""

    name: str
    motion: float | None  # None: no motion (strength 0)
    frames: int  # video length run; every shorter measured length is its first frames
    kwargs: dict = field(default_factory=dict)  # engine keywords
    independent: bool = False  # one-frame runs, each frame with its own seed
    legacy_warp: bool = False  # the warp before the fix (bench.warp_check): a control row


def seed_range(settings: Settings) -> range:
    """The seeds a run measures: ``settings.seeds`` of them from ``settings.first_seed``."""
    return range(settings.first_seed, settings.first_seed + settings.seeds)


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
    flow_modes: Sequence[str] = FLOW_MODES,
) -> Models:
    """Engines for the sections asked for (the flow section: for ``flow_modes``), through
    the same loading code as user models."""
    base = load_base_model(names[0], dtype=dtype, device=device)
    controlnet = pix2pix = None
    if "flow" in sections:
        sections = [*sections, *flow_modes]
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
    for seed in seed_range(settings):
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
        for seed in seed_range(settings):
            scene = scene_for(seed)
            frames = text2video(models.base, settings, variant, scene.prompt(), seed)
            shifts = displacements(settings, variant.motion, variant.frames)
            colour = scene.shapes[0].colour
            for length, figures in video_figures(frames, shifts, colour, lengths).items():
                per_length[length].append(figures)
                per_seed.setdefault(f"{variant.name}, {length} frames", []).append(figures)
            if seed == settings.first_seed:
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
        for seed in seed_range(settings):
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
            if seed == settings.first_seed:
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
        for seed in seed_range(settings):
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
            if seed == settings.first_seed:
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


# ---------------------------------------------------------------------------- flow
#
# Flow-guided consistency against the paper's, where the true motion is known exactly: the
# ControlNet and Pix2Pix scenes above (a shape moving over a static background), each seed
# run per configuration on the same models. Warp error: the colour difference between frame
# k and frame k - 1 warped by the TRUE motion, over pixels visible in both (away from the
# shape's edge), as CIE76 Delta E and pixel MSE (RGB in [0, 1]).

# The judged configurations; "flow, reversed" (the true motion with its sign flipped: the
# flow applied the wrong way round, which must not beat the right one) is a control row
# that --flow-reversed adds.
FLOW_CONFIGS = ("paper", "flow, true motion", "flow, estimated")
FLOW_REVERSED = "flow, reversed"
WARP_FIGURES = ("warp_de", "warp_mse")
FLOW_QUALITY: dict[str, tuple[str, ...]] = {
    "controlnet": ("silhouette_iou", "colour_drift"),
    "pix2pix": ("edit_success", "structure_iou", "colour_drift"),
}
BOOTSTRAP = 2000  # resamples of the seeds for the warp error ratio's interval


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
        mask = visible[k - 1]
        if not mask.any():
            continue
        prev = torch.from_numpy(frames[k - 1]).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
        flow = torch.from_numpy(backward[k - 1]).permute(2, 0, 1)[None]  # (1, 2, H, W)
        warped = flow_warp(prev, flow)[0].permute(1, 2, 0).numpy()  # (H, W, 3) in [0, 255]
        now = frames[k].astype(np.float64)
        de.append(float(sm.delta_e(sm.srgb_to_lab(now), sm.srgb_to_lab(warped))[mask].mean()))
        mse.append(float((((now - warped) / 255.0) ** 2).mean(axis=-1)[mask].mean()))
    return _nanmean(de), _nanmean(mse)


def flow_inputs(
    config: str, scene: shapes.Scene, velocity: tuple, video: np.ndarray, latent: int
) -> dict:
    """Engine keywords of a flow configuration for one moving-shape video."""
    n, size = len(video), video.shape[1]
    if config == "paper":
        return {}
    if config in ("flow, true motion", FLOW_REVERSED):
        backward, forward, _ = true_flows(scene, velocity, n, size)
        sign = -1 if config == FLOW_REVERSED else 1
        pairs = {k: (sign * backward[k - 1], sign * forward[k - 1]) for k in range(1, n)}
        flow = GivenFlows(pairs, (latent, latent))
    elif config == "flow, estimated":
        flow = EstimatedFlows(dict(enumerate(video)), range(n), (latent, latent))
    else:
        raise ValueError(f"unknown flow configuration {config!r}")
    return {"consistency": "flow", "flow": flow}


def flow_video(
    mode: str,
    engine: TextToVideoZero,
    settings: Settings,
    seed: int,
    config: str,
    fusion: FlowFusion | None = None,
) -> np.ndarray:
    """Decoded frames of one seed's ControlNet or Pix2Pix video under a flow configuration
    (``fusion``: the flow's settings, default the engine's), fused in pixel space as a
    job's are (service/runner.py)."""
    n, size = settings.control_frames, settings.size
    scene, velocity, video = moving_source(seed, n, size)
    inputs = flow_inputs(config, scene, velocity, video, size // engine.base.vae_scale_factor)
    fusion = fusion or FlowFusion()
    if inputs:
        inputs["flow_fusion"] = fusion
    common = dict(
        num_frames=n,
        height=size,
        width=size,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        seed=seed,
        chunk_size=n,
        motion_dynamics=False,
        **inputs,
    )
    if mode == "controlnet":
        control = {k: _tensor(canny(video[k])) for k in range(n)}
        latents = engine(
            prompt=scene.prompt(),
            controls=[ControlInput(engine.controlnets[0], control, 1.0)],
            **common,
        )
    elif mode == "pix2pix":
        latents = engine(
            prompt=edit_for(seed, scene).instruction,
            image={k: _tensor(video[k]) for k in range(n)},
            image_guidance_scale=settings.image_guidance,
            **common,
        )
    else:
        raise ValueError(f"unknown flow mode {mode!r}: expected one of {FLOW_MODES}")
    if not inputs or fusion.pixel_strength == 0:
        return decode(engine, latents)
    pixels = FrameFusion(inputs["flow"].pixels, fusion.pixel_strength)
    return pixels(range(n), engine.decode(latents)).numpy()


def flow_figures(mode: str, frames: np.ndarray, seed: int, size: int) -> dict[str, float]:
    """Warp error against the true motion and the mode's quality figures of one video."""
    scene, velocity, video = moving_source(seed, len(frames), size)
    backward, _, visible = true_flows(scene, velocity, len(frames), size)
    de, mse = warp_errors(frames, backward, visible)
    row = {"warp_de": de, "warp_mse": mse}
    if mode == "pix2pix":
        row.update(edit_figures(frames, video, edit_for(seed, scene), velocity, size))
        return row
    truth = [
        shapes.silhouette(shapes.moving_scene(scene, k, velocity), size, size) >= 0.5
        for k in range(len(frames))
    ]
    readings = [sm.read_image(f, classify=False) for f in frames]
    row["silhouette_iou"] = _nanmean(
        [sm.iou(r.mask, s) for r, s in zip(readings, truth, strict=True)]
    )
    row["colour_drift"] = video_figures(frames, [(0.0, 0.0)] * len(frames))[len(frames)][
        "colour_drift"
    ]
    return row


def flow_mode(
    mode: str,
    engine: TextToVideoZero,
    settings: Settings,
    configs: Sequence[str] = FLOW_CONFIGS,
    sheet_rows: list | None = None,
    fusion: FlowFusion | None = None,
) -> tuple[dict[str, list[dict[str, float]]], dict[str, float]]:
    """Per-seed figures of each configuration and its seconds per video (one mode; flow
    with ``fusion``, default the engine's); the first ``settings.sheet_seeds`` seeds'
    frames go into ``sheet_rows``."""
    n, size = settings.control_frames, settings.size
    per_seed: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    seconds = dict.fromkeys(configs, 0.0)
    for seed in seed_range(settings):
        for config in configs:
            started = time.perf_counter()
            frames = flow_video(mode, engine, settings, seed, config, fusion)
            seconds[config] += time.perf_counter() - started
            per_seed[config].append(flow_figures(mode, frames, seed, size))
            if sheet_rows is not None and seed - settings.first_seed < settings.sheet_seeds:
                if config == configs[0]:
                    sheet_rows.append(_flow_source_row(mode, seed, n, size))
                sheet_rows.append((f"{seed}: {config}", frames))
        progress(f"flow {mode} seed {seed - settings.first_seed + 1}/{settings.seeds}")
    return per_seed, {c: s / settings.seeds for c, s in seconds.items()}


def _flow_source_row(mode: str, seed: int, n: int, size: int) -> tuple[str, np.ndarray]:
    """The contact sheet's row of what a seed's videos follow: edges or the source video."""
    scene, _, video = moving_source(seed, n, size)
    if mode == "controlnet":
        return f"{seed}: control (canny)", np.stack([canny(f) for f in video])
    return f"{seed}: {edit_for(seed, scene).instruction}", video


def paired_difference(values: Sequence[float], baseline: Sequence[float]) -> tuple[float, ...]:
    """Mean of values - baseline over the seeds where both are numbers, and its 95 %
    t-interval (NaN bounds with fewer than two seeds)."""
    from scipy.stats import t

    pairs = np.array(
        [(v, b) for v, b in zip(values, baseline, strict=True) if np.isfinite(v) and np.isfinite(b)]
    ).reshape(-1, 2)
    diff = pairs[:, 0] - pairs[:, 1]
    if len(diff) == 0:
        return math.nan, math.nan, math.nan
    mean = float(diff.mean())
    if len(diff) < 2:
        return mean, math.nan, math.nan
    half = float(t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff)))
    return mean, mean - half, mean + half


def ratio_interval(values: Sequence[float], baseline: Sequence[float]) -> tuple[float, ...]:
    """mean(values) / mean(baseline) over the seeds where both are numbers, and its 95 %
    interval from resampling those seeds (paired; the same resamples every run; NaN bounds
    with fewer than two seeds)."""
    pairs = np.array(
        [(v, b) for v, b in zip(values, baseline, strict=True) if np.isfinite(v) and np.isfinite(b)]
    ).reshape(-1, 2)
    if len(pairs) == 0:
        return math.nan, math.nan, math.nan
    ratio = float(pairs[:, 0].mean() / pairs[:, 1].mean())
    if len(pairs) < 2:
        return ratio, math.nan, math.nan
    index = np.random.default_rng(0).integers(0, len(pairs), (BOOTSTRAP, len(pairs)))
    resampled = pairs[index].mean(axis=1)  # (BOOTSTRAP, 2)
    low, high = np.percentile(resampled[:, 0] / resampled[:, 1], [2.5, 97.5])
    return ratio, float(low), float(high)


def seeds_above(values: Sequence[float], baseline: Sequence[float]) -> tuple[int, int]:
    """How many seeds' value is above, and how many below, the baseline's (NaNs left out):
    whether a difference of means is most seeds or a few far ones."""
    pairs = [(v, b) for v, b in zip(values, baseline, strict=True) if np.isfinite(v - b)]
    return sum(v > b for v, b in pairs), sum(v < b for v, b in pairs)


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean over the values that are numbers (NaN with fewer than 2)."""
    kept = [v for v in values if np.isfinite(v)]
    return float(np.std(kept, ddof=1) / math.sqrt(len(kept))) if len(kept) > 1 else math.nan


def flow_rows(
    mode: str, per_seed: dict[str, list[dict[str, float]]], seconds: dict[str, float]
) -> list[dict]:
    """One row a configuration: each figure's mean and standard error over seeds; warp
    errors as a ratio to the paper's, the quality figures as a paired difference from the
    paper's, each with its 95 % interval."""
    paper = per_seed["paper"]
    rows = []
    for config, seeds in per_seed.items():
        row: dict = {"mode": mode, "variant": config, **summarise(seeds)}
        for name in (*WARP_FIGURES, *FLOW_QUALITY[mode]):
            values, baseline = [s[name] for s in seeds], [s[name] for s in paper]
            row[f"{name}_se"] = standard_error(values)
            if name in WARP_FIGURES:
                keys = (f"{name}_ratio", f"{name}_ratio_lo", f"{name}_ratio_hi")
                row.update(zip(keys, ratio_interval(values, baseline), strict=True))
            elif config != "paper":
                keys = (f"{name}_diff", f"{name}_diff_lo", f"{name}_diff_hi")
                row.update(zip(keys, paired_difference(values, baseline), strict=True))
                row[f"{name}_above"], row[f"{name}_below"] = seeds_above(values, baseline)
        row["s_per_video"] = seconds[config]
        rows.append(row)
    return rows


def run_flow(models: Models, settings: Settings, out: Outputs) -> list[dict]:
    """Flow-guided consistency against the paper, per mode and configuration."""
    configs = FLOW_CONFIGS + ((FLOW_REVERSED,) if settings.flow_reversed else ())
    rows = []
    for mode in settings.flow_modes:
        engine = models.controlnet if mode == "controlnet" else models.pix2pix
        sheet_rows: list = []
        started = time.perf_counter()
        per_seed, seconds = flow_mode(mode, engine, settings, configs, sheet_rows)
        progress(f"flow {mode}: {time.perf_counter() - started:.0f} s")
        out.per_seed.setdefault("flow", {}).update(
            {f"{mode}, {config}": figures for config, figures in per_seed.items()}
        )
        rows.extend(flow_rows(mode, per_seed, seconds))
        if sheet_rows:
            out.sheets[f"flow-{mode}"] = labelled_rows(sheet_rows, label_width=180)
    return rows


def flow_table(rows: list[dict]) -> str:
    """Three fixed-width tables a mode: warp errors (ratio to paper), quality kept
    (difference from paper; mean +- standard error over seeds, [95 % interval]) and how
    many seeds' quality figures lie above and below the paper's."""
    blocks = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        part = [r for r in rows if r["mode"] == mode]
        warp = [
            ["configuration", "warp dE", "x paper [95%]", "warp MSE", "x paper [95%]", "s/video"]
        ]
        kept = [["configuration"]]
        signs = [["seeds above / below paper"]]
        for name in FLOW_QUALITY[mode]:
            kept[0] += [HEADERS.get(name, name), "- paper [95%]"]
            signs[0].append(HEADERS.get(name, name))
        for r in part:
            warp.append(
                [
                    r["variant"],
                    f"{r['warp_de']:.3f} ± {r['warp_de_se']:.3f}",
                    _ratio_cell(r, "warp_de"),
                    f"{r['warp_mse']:.5f} ± {r['warp_mse_se']:.5f}",
                    _ratio_cell(r, "warp_mse"),
                    f"{r['s_per_video']:.1f}",
                ]
            )
            line = [r["variant"]]
            for name in FLOW_QUALITY[mode]:
                digits = 2 if name == "colour_drift" else 3
                line.append(f"{r[name]:.{digits}f} ± {r[f'{name}_se']:.{digits}f}")
                line.append(_diff_cell(r, name, digits))
            kept.append(line)
            if r["variant"] != "paper":
                signs.append(
                    [r["variant"]]
                    + [f"{r[f'{n}_above']} / {r[f'{n}_below']}" for n in FLOW_QUALITY[mode]]
                )
        seeds = int(part[0]["seeds"])
        blocks.append(f"{mode}, {seeds} seeds\n{_grid(warp)}\n{_grid(kept)}\n{_grid(signs)}")
    legend = (
        "mean ± standard error over seeds; x paper: ratio of the means, [95 % interval] from "
        "resampling seeds; - paper: mean paired difference, [95 % t-interval]"
    )
    return "\n\n".join([legend, *blocks])


def _ratio_cell(row: dict, name: str) -> str:
    """'ratio [low, high]' of a warp figure, '1' for the paper."""
    if row["variant"] == "paper":
        return "1"
    return (
        f"{row[f'{name}_ratio']:.2f} [{row[f'{name}_ratio_lo']:.2f}, {row[f'{name}_ratio_hi']:.2f}]"
    )


def _diff_cell(row: dict, name: str, digits: int) -> str:
    """'difference [low, high]' of a quality figure from the paper's, empty for the paper."""
    if f"{name}_diff" not in row:
        return ""
    low, mean, high = (row[f"{name}_diff{s}"] for s in ("_lo", "", "_hi"))
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def _grid(lines: list[list[str]]) -> str:
    """Cells in columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )


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
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(DEFAULT_SECTIONS),
        help=f"default: {' '.join(DEFAULT_SECTIONS)}",
    )
    parser.add_argument("--seeds", type=int, default=Settings.seeds, help="seeds per configuration")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=Settings.first_seed,
        help="the first seed (default 0); choose settings on seeds disjoint from the judged 0..31",
    )
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--guidance", type=float, default=Settings.guidance)
    parser.add_argument("--quick", action="store_true", help="4 seeds: a smoke run, not figures")
    parser.add_argument(
        "--rows",
        nargs="+",
        default=[],
        help="only the text2video rows whose name contains one of these words",
    )
    parser.add_argument(
        "--flow-modes",
        nargs="+",
        choices=FLOW_MODES,
        default=list(FLOW_MODES),
        help="the flow section's modes",
    )
    parser.add_argument(
        "--flow-reversed",
        action="store_true",
        help="the flow section's control row too: the true motion applied the wrong way round",
    )
    parser.add_argument(
        "--sheet-seeds",
        type=int,
        default=Settings.sheet_seeds,
        help="seeds whose videos the flow section's contact sheets show",
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
    "flow": run_flow,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(
        seeds=4 if args.quick else args.seeds,
        first_seed=args.first_seed,
        steps=args.steps,
        guidance=args.guidance,
        rows=tuple(args.rows),
        flow_modes=tuple(dict.fromkeys(args.flow_modes)),
        flow_reversed=args.flow_reversed,
        sheet_seeds=args.sheet_seeds,
    )
    names = tuple(args.models) if args.models else TINY_MODELS if args.tiny else SHAPES_MODELS
    started = time.perf_counter()
    device = resolve_device(args.device)
    dtype = choose_dtype(args.dtype, device)
    models = load_models(names, args.sections, dtype.dtype, device, settings.flow_modes)
    command = "python -m bench.quality " + shlex.join(sys.argv[1:] if argv is None else argv)
    header = (
        f"command: {command}\n"
        f"machine: {device_name(device)}, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}, "
        f"python {platform.python_version()}, dtype {dtype.name} ({dtype.reason})\n"
        f"models: {', '.join(names)}; {settings.size}x{settings.size}, {settings.steps} steps, "
        f"guidance {settings.guidance}, {settings.seeds} seeds"
        + (f" from {settings.first_seed}" if settings.first_seed else "")
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
        elif section == "flow":
            print(flow_table(result))
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
