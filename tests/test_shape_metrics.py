"""The quality benchmark's image analysis (bench/shape_metrics.py) on the world's own renders.

Renders of ``backend.models.shapes`` are the ground truth: the analysis must read back the scene
that drew them (fidelity ~1), a render's foreground must be its silhouette (IoU ~1), and a
panned video compensated by its own motion must show no shape change, no colour drift and
no background error. Corrupted videos (one colour changed, rows duplicated on odd frames as
a tie-rounding nearest warp does) must score visibly worse. No model runs here.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest

from backend.models import shapes
from bench import shape_metrics as sm


def one_shape_scenes(count: int, seed: int = 0) -> list[shapes.Scene]:
    rng = random.Random(seed)
    return [shapes.random_scene(rng, two_shapes=0.0) for _ in range(count)]


def test_lab_of_known_colours() -> None:
    lab = sm.srgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0]]))
    np.testing.assert_allclose(lab[0], [100, 0, 0], atol=0.05)
    np.testing.assert_allclose(lab[1], [0, 0, 0], atol=0.05)
    np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.05)  # CIELAB of sRGB red
    assert sm.delta_e(lab[0], lab[1]) == pytest.approx(100, abs=0.05)


def test_every_palette_tone_is_labelled_with_its_colour() -> None:
    for i, name in enumerate(shapes.COLOURS):
        full = np.array(shapes.PALETTE[name], dtype=np.float64)
        pixels = np.stack([full, shapes.SHADE * full]).round().astype(np.uint8)[None]  # (1, 2, 3)
        assert (sm.label_colours(pixels) == i).all(), name
    black = np.zeros((1, 1, 3), dtype=np.uint8)  # 61 Delta E from the nearest tone: no colour
    assert sm.label_colours(black)[0, 0] == sm.NO_COLOUR


def test_renders_read_back_as_their_prompt() -> None:
    """Fidelity of the world's own images: colour, shape and background all match."""
    scenes = one_shape_scenes(40)
    results = [sm.matches_prompt(sm.read_image(shapes.render(s)), s) for s in scenes]
    fidelity = np.mean([all(r.values()) for r in results])
    assert fidelity == 1.0


def test_shape_kinds_fit_their_templates_and_not_the_others() -> None:
    scene = shapes.Scene("blue", "checks", (shapes.Shape("circle", "red", 0.5, 0.5, 0.25),))
    for kind in shapes.SHAPES:
        one = replace(scene, shapes=(replace(scene.shapes[0], kind=kind),))
        mask = shapes.silhouette(one) >= 0.5
        found, fit = sm.fit_shape(mask)
        assert found == kind and fit > 0.95, (kind, found, fit)


def test_a_shape_cut_by_the_frame_is_still_classified() -> None:
    for kind in shapes.SHAPES:
        scene = shapes.Scene("green", "stripes", (shapes.Shape(kind, "white", 0.22, 0.8, 0.28),))
        reading = sm.read_image(shapes.render(scene))
        assert reading.kind == kind


def test_render_foreground_is_its_silhouette() -> None:
    for scene in one_shape_scenes(12, seed=1):
        reading = sm.read_image(shapes.render(scene))
        truth = shapes.silhouette(scene) >= 0.5
        assert sm.iou(reading.mask, truth) > 0.9, scene.prompt()


def test_two_shapes_foreground_is_both_and_the_bigger_colour_dominates() -> None:
    big = shapes.Shape("square", "yellow", 0.3, 0.3, 0.25)
    small = shapes.Shape("circle", "red", 0.75, 0.75, 0.15)
    scene = shapes.Scene("purple", "noise", (big, small), texture_seed=3)
    reading = sm.read_image(shapes.render(scene))
    assert sm.iou(reading.mask, shapes.silhouette(scene) >= 0.5) > 0.9
    assert reading.foreground == "yellow" and reading.kind == "square"


def test_a_wrong_colour_or_shape_is_caught() -> None:
    scene = one_shape_scenes(1, seed=2)[0]
    shape = scene.shapes[0]
    other_colour = next(c for c in shapes.COLOURS if c not in (shape.colour, scene.background))
    other_kind = next(k for k in shapes.SHAPES if k != shape.kind)
    drawn = replace(scene, shapes=(replace(shape, colour=other_colour, kind=other_kind),))
    match = sm.matches_prompt(sm.read_image(shapes.render(drawn)), scene)
    assert match == {"colour": False, "shape": False, "background": True}


def panned_video(frames: int = 6, step_px: int = 2) -> tuple[np.ndarray, list]:
    """A camera pan moving the content by ``step_px`` pixels up-left per frame."""
    scene = shapes.Scene("blue", "checks", (shapes.Shape("circle", "red", 0.5, 0.5, 0.2),))
    velocity = (step_px / 64, step_px / 64)
    video = shapes.render_video(scene, frames, camera_velocity=velocity)
    displacements = [(-k * step_px, -k * step_px) for k in range(frames)]
    return video, displacements


def test_translate_moves_content_and_marks_what_it_covers() -> None:
    image = np.arange(16).reshape(4, 4)
    moved, valid = sm.translate(image, 1, -2)
    np.testing.assert_array_equal(moved[:2, 1:], image[2:, :3])
    assert valid.sum() == 6 and not valid[2:].any() and not valid[:, 0].any()


def test_panned_render_compensated_by_its_motion_is_unchanged() -> None:
    video, displacements = panned_video()
    result = sm.compare_to_first(video, displacements)
    assert [r.displacement for r in result] == [tuple(map(int, d)) for d in displacements[1:]]
    for r in result:
        assert r.shape_iou == pytest.approx(1.0)
        assert r.background_error == pytest.approx(0.0, abs=1e-6)
        assert r.colour_drift == pytest.approx(0.0, abs=1e-6)


def test_uncompensated_motion_shows_as_error() -> None:
    """The same pan measured as if it were still: the figures must see the difference."""
    video, _ = panned_video()
    result = sm.compare_to_first(video, [(0, 0)] * len(video))
    assert max(r.background_error for r in result) > 10
    assert min(r.shape_iou for r in result) < 0.8


def test_latent_grid_compensation_picks_the_warp_rounding() -> None:
    """Content that moved by whole latent pixels (8 px) is found from a fractional nominal."""
    video, _ = panned_video(frames=3, step_px=8)
    nominal = [(0.0, 0.0), (-5.3, -5.3), (-13.0, -13.0)]  # warp rounded to -8 and -16
    result = sm.compare_to_first(video, nominal, quantum=8)
    assert [r.displacement for r in result] == [(-8, -8), (-16, -16)]
    assert all(r.residual == pytest.approx(0.0, abs=1e-6) for r in result)


def test_colour_drift_measures_a_recoloured_shape() -> None:
    video, displacements = panned_video(frames=3)
    scene = shapes.Scene("blue", "checks", (shapes.Shape("circle", "orange", 0.5, 0.5, 0.2),))
    video[2] = shapes.render(scene, camera=(4 / 64, 4 / 64))
    result = sm.compare_to_first(video, displacements)
    red, orange = sm.srgb_to_lab(np.array([shapes.PALETTE["red"], shapes.PALETTE["orange"]]))
    assert result[0].colour_drift == pytest.approx(0.0, abs=1e-6)
    # The eroded core is flat colour: its mean is the palette colour.
    assert result[1].colour_drift == pytest.approx(sm.delta_e(red, orange), rel=0.02)


def duplicate_rows_and_columns(image: np.ndarray, block: int = 8) -> np.ndarray:
    """What a nearest latent warp that rounds half-pixel ties to even does to a decoded frame:
    latent rows and columns come in equal pairs (0, 0, 2, 2, ...), i.e. 8-pixel bands."""
    pixel = np.arange(image.shape[0])
    index = pixel // (2 * block) * (2 * block) + pixel % block
    return image[index][:, index]


def test_odd_even_ratio_sees_duplicated_rows_on_odd_frames() -> None:
    video, displacements = panned_video(frames=7)
    residuals = [r.residual for r in sm.compare_to_first(video, displacements)]
    clean_ratio, clean_flicker = sm.odd_even_ratio(residuals), sm.flicker(residuals)
    for k in range(1, len(video), 2):
        video[k] = duplicate_rows_and_columns(video[k])
    residuals = [r.residual for r in sm.compare_to_first(video, displacements)]
    assert math.isnan(clean_ratio) or clean_ratio < 1.5  # all zero: no alternation
    assert clean_flicker == pytest.approx(0.0, abs=1e-6)
    assert sm.odd_even_ratio(residuals) > 10
    assert sm.flicker(residuals) > 5  # Delta E; the clean video's is 0


def test_motion_out_of_the_frame_gives_no_comparison() -> None:
    video, _ = panned_video(frames=2)
    result = sm.compare_to_first(video, [(0, 0), (60, 0)])
    assert math.isnan(result[0].shape_iou) and result[0].valid_fraction == 0.0
