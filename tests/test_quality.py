"""Tests that can see: decoded pictures of the trained ``builtin:shapes`` model, read by
bench.shape_metrics, at small scale (64x64, 8 frames, 10 steps, a few seeds).

The configurations are rows of ``bench.quality`` (same code, seeds and prompts), so each
threshold sits with a margin from figures measured there: the 32-seed means in QUALITY.md
and the per-seed values in bench/results/quality-t2v-cpu.json (``per_seed``). Each test also
runs the broken variant it guards against (cross-frame attention off, the legacy warp that
duplicates latent rows on ties, prompts that differ only in their colour) and checks that the
same figure sees it, so a threshold that could never fail shows up here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend.engine.pipeline import TextToVideoZero
from backend.models.loading import ModelLoadError, load_base_model
from bench import shape_metrics as sm
from bench.demo_pan import demo_flag, pan_ious, read_frames
from bench.quality import (
    LATE_WARP,
    Settings,
    Variant,
    displacements,
    scene_for,
    text2video,
    video_figures,
)

pytestmark = pytest.mark.slow

SETTINGS = Settings(frames=8, short=8)  # bench.quality's 8-frame rows, 10 steps


@pytest.fixture(scope="module")
def shapes_engine(_single_threaded_torch: None) -> TextToVideoZero:
    """The trained text-to-image shapes model (skips only while it is not in the checkout)."""
    try:
        base = load_base_model("builtin:shapes")
    except ModelLoadError as exc:
        if "unknown built-in model" in str(exc) or "missing from this installation" in str(exc):
            pytest.skip(f"builtin:shapes is not in this checkout yet: {exc}")
        raise
    return TextToVideoZero(base)


def mean_figure(engine: TextToVideoZero, variant: Variant, seeds: range, name: str) -> float:
    """A figure of a bench.quality text2video row, averaged over ``seeds``."""
    values = []
    for seed in seeds:
        scene = scene_for(seed)
        frames = text2video(engine, SETTINGS, variant, scene.prompt(), seed)
        shifts = displacements(SETTINGS, variant.motion, variant.frames)
        figures = video_figures(frames, shifts, scene.shapes[0].colour)[variant.frames]
        values.append(figures[name])
    return float(np.nanmean(values))


def read_one_image(
    engine: TextToVideoZero, prompt: str, seed: int, classify: bool = True
) -> sm.ImageReading:
    """One 64x64 image of ``prompt`` (bench.quality's fidelity settings), read."""
    latents = engine(
        prompt=prompt,
        num_frames=1,
        height=64,
        width=64,
        num_inference_steps=SETTINGS.steps,
        seed=seed,
        motion_dynamics=False,
    )
    return sm.read_image(engine.decode(latents)[0].numpy(), classify=classify)


def test_the_prompt_colour_is_drawn(shapes_engine: TextToVideoZero) -> None:
    """One seed, one shape, one background, four colours. QUALITY.md fidelity: colour right
    for 1.000 of 32 prompts, background for 1.000. If the engine dropped the colour word the
    four runs would be one picture: at most one of four could match; we ask for three."""
    colours = ["red", "green", "yellow", "white"]
    readings = [
        read_one_image(shapes_engine, f"a {colour} square on a blue background", 0, classify=False)
        for colour in colours
    ]
    drawn = [r.foreground for r in readings]
    assert sum(d == c for d, c in zip(drawn, colours, strict=True)) >= 3, drawn
    assert all(r.background == "blue" for r in readings), [r.background for r in readings]


def test_the_prompt_shape_is_drawn(shapes_engine: TextToVideoZero) -> None:
    """Two seeds, three shape words, one colour pair. QUALITY.md fidelity: shape kind right
    for 0.969 of 32 prompts (and of 64); these six read 6 of 6 (template IoU 0.86 to 0.97).
    If the engine dropped the shape word, the three runs of a seed would be one picture,
    which reads as at most one of the three kinds: at most 2 of 6 right; we ask for 5."""
    readings = [
        (kind, read_one_image(shapes_engine, f"a yellow {kind} on a purple background", seed).kind)
        for seed in (0, 1)
        for kind in ("circle", "square", "triangle")
    ]
    assert sum(want == got for want, got in readings) >= 5, readings


# Background Delta E of the bench.quality rows "no motion dynamics" (with cross-frame
# attention) and "no motion, no cross-frame attn", 8 frames: 32-seed means 6.58 and 11.32
# (QUALITY.md, text2video table); seeds 0-5 (bench/results/quality-t2v-extra-cpu.json,
# per_seed) 8.16 and 11.18. The threshold sits between, 1.4 and 1.6 from each.
BG_ERROR_MAX = 9.6
# Odd/even residual ratio of the rows "full m32, t0 4 t1 5" and "legacy warp m32, t0 4 t1 5",
# 8 frames: 32-seed means 0.75 and 1.11 (QUALITY.md); seeds 0-7 (same JSON) 0.79 and 1.13
# (seeds 0-5 alone: 0.79 and 0.96, too close, hence eight seeds).
ODD_EVEN_MAX = 0.96


def test_cross_frame_attention_keeps_the_background(shapes_engine: TextToVideoZero) -> None:
    """Background error (Delta E from frame 1) of 8-frame videos without motion, seeds 0-5:
    frames that attend to frame 1 keep its texture; without, some switch stripes to checks."""
    seeds = range(6)
    with_attn = mean_figure(shapes_engine, Variant("with", None, 8), seeds, "bg_error")
    without = mean_figure(
        shapes_engine,
        Variant("without", None, 8, {"cross_frame_attention": False}),
        seeds,
        "bg_error",
    )
    assert with_attn < BG_ERROR_MAX < without, (with_attn, without)


# The same rows on builtin:shapes-xl: 32-seed means 7.32 and 11.42 (QUALITY.md, SDXL in
# miniature); seeds 0-5: 7.98 and 10.35, measured with this test's code. Between, 1.2 and
# 1.15 from each.
XL_BG_ERROR_MAX = 9.2


def test_cross_frame_attention_keeps_the_background_on_sdxl(
    _single_threaded_torch: None,
) -> None:
    """SDXL's layout attends only below the full latent resolution, on two stacked blocks:
    cross-frame attention there must still tie the background to frame 1."""
    engine = TextToVideoZero(load_base_model("builtin:shapes-xl"))
    seeds = range(6)
    with_attn = mean_figure(engine, Variant("with", None, 8), seeds, "bg_error")
    without = mean_figure(
        engine,
        Variant("without", None, 8, {"cross_frame_attention": False}),
        seeds,
        "bg_error",
    )
    assert with_attn < XL_BG_ERROR_MAX < without, (with_attn, without)


def test_the_motion_warp_moves_frames_cleanly(shapes_engine: TextToVideoZero) -> None:
    """Odd/even residual ratio of 8-frame videos at motion 32 (0.5 latent px per frame: every
    odd frame sits on a tie), warp on a half-formed latent (t0 4, t1 5 of 10 steps), seeds
    0-7. The legacy warp (nearest at exactly x + s, ties to even) duplicates latent rows on
    odd frames; at the default t0/t1 (8, 9 of 10) the warp acts on near noise and decoded
    frames barely show it (QUALITY.md: odd/even 0.87 legacy, 0.80 fixed)."""
    seeds = range(8)
    fixed = mean_figure(shapes_engine, Variant("fixed", 32.0, 8, LATE_WARP), seeds, "odd_even")
    legacy = mean_figure(
        shapes_engine, Variant("legacy", 32.0, 8, LATE_WARP, legacy_warp=True), seeds, "odd_even"
    )
    assert fixed < ODD_EVEN_MAX < legacy, (fixed, legacy)


def test_the_install_demo_shows_a_red_shape_on_blue(
    shapes_engine: TextToVideoZero, tmp_path: Path
) -> None:
    """``install_deps.py --demo`` through the CLI: every frame reads as a red shape on a blue
    background, and the shape follows the camera pan (docs/demo-shapes.png is this run).

    Shape IoU against frame 1 moved by the pan (``bench.demo_pan``): 0.74 mean, 0.49 worst
    frame for the demo (t0 8, t1 10 of 20, seed 1). The earlier demo (the default t0/t1,
    18 and 19, seed 0) drew the circle anew in each frame: 0.14. Over seeds 0-7
    (``python -m bench.demo_pan``): 0.65 against 0.33 at the default.
    """
    import install_deps
    from backend.service.cli import main

    out = tmp_path / "demo"
    assert main(["generate", *install_deps.SHAPES_DEMO, "--frames", "8", "--out", str(out)]) == 0
    frames = read_frames(out)
    assert len(frames) == 8
    readings = [sm.read_image(f, classify=False) for f in frames]
    assert [(r.foreground, r.background) for r in readings] == [("red", "blue")] * 8
    ious = pan_ious(frames, float(demo_flag(install_deps.SHAPES_DEMO, "--motion")))
    assert np.mean(ious) > 0.6 and min(ious) > 0.3, ious
