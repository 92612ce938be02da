"""backend/models/shapes.py: the synthetic world the built-in shapes models are trained on."""

from __future__ import annotations

import random

import numpy as np
import pytest

from backend.models import shapes
from backend.models.shapes import PALETTE, Scene, Shape


def nearest_colour(pixel: np.ndarray) -> str:
    """The palette colour closest to an RGB pixel (full tone)."""
    return min(PALETTE, key=lambda c: float(np.sum((np.asarray(PALETTE[c]) - pixel) ** 2)))


def test_prompt_and_scene_round_trip() -> None:
    rng = random.Random(0)
    for _ in range(50):
        scene = shapes.random_scene(rng, two_shapes=0.5)
        parsed = shapes.scene_from_prompt(scene.prompt(), random.Random(1))
        assert parsed.prompt() == scene.prompt()
        assert parsed.background == scene.background
        assert [(s.kind, s.colour) for s in parsed.shapes] == [
            (s.kind, s.colour) for s in scene.shapes
        ]


def test_prompt_text() -> None:
    scene = Scene("blue", "checks", (Shape("circle", "red", 0.5, 0.5, 0.2),))
    assert scene.prompt() == "a red circle on a blue background"
    two = Scene("blue", "checks", scene.shapes + (Shape("square", "green", 0.2, 0.2, 0.1),))
    assert two.prompt() == "a red circle and a green square on a blue background"


@pytest.mark.parametrize(
    "prompt, match",
    [("a red circle", "not 'a COLOUR"), ("a red blob on a blue background", "names no shape")],
)
def test_bad_prompts_are_refused(prompt: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        shapes.scene_from_prompt(prompt)


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="'pink'"):
        shapes.render(Scene("pink", "checks", ()))
    with pytest.raises(ValueError, match="'hexagon'"):
        shapes.render(Scene("blue", "checks", (Shape("hexagon", "red", 0.5, 0.5, 0.2),)))


def test_render_is_deterministic_and_depends_on_the_scene() -> None:
    rng = random.Random(3)
    scene = shapes.random_scene(rng)
    a, b = shapes.render(scene), shapes.render(scene)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, shapes.render(shapes.random_scene(rng)))


def test_colours_of_shape_and_background() -> None:
    scene = Scene("blue", "stripes", (Shape("square", "yellow", 0.5, 0.5, 0.25),))
    image = shapes.render(scene).astype(int)
    assert nearest_colour(image[32, 32]) == "yellow"
    background = image[shapes.silhouette(scene) == 0]
    # Background pixels are blue at full or SHADE tone; the brightest is the full colour.
    assert nearest_colour(background[background.sum(axis=1).argmax()]) == "blue"
    tone = background.sum(axis=1)
    assert tone.min() < 0.7 * tone.max()  # textured, not flat


def test_texture_moves_with_the_camera() -> None:
    scene = Scene("green", "checks", ())
    shift = 8  # pixels: half a texture period (16 px at 64 px)
    still = shapes.render(scene).astype(int)
    panned = shapes.render(scene, camera=(shift / 64, 0.0)).astype(int)
    np.testing.assert_array_equal(panned[:, :-shift], still[:, shift:])
    assert np.abs(panned - still).mean() > 10  # the pan is visible


@pytest.mark.parametrize("kind", shapes.SHAPES)
def test_silhouette_matches_the_render(kind: str) -> None:
    scene = Scene("white", "noise", (Shape(kind, "purple", 0.4, 0.6, 0.25),), texture_seed=5)
    mask = shapes.silhouette(scene)
    image = shapes.render(scene).astype(int)
    inside = mask > 0.99
    outside = mask < 0.01
    purple = np.asarray(PALETTE["purple"])
    assert inside.sum() > 200
    assert np.abs(image[inside] - purple).max() <= 1
    # No background pixel (white at full or SHADE tone) is anywhere near purple.
    assert np.abs(image[outside] - purple).sum(axis=1).min() > 100


def test_triangle_points_up() -> None:
    mask = shapes.silhouette(Scene("white", "noise", (Shape("triangle", "red", 0.5, 0.5, 0.3),)))
    rows = mask.sum(axis=1)
    filled = np.nonzero(rows)[0]
    assert rows[filled[0] + 2] < rows[filled[-1] - 2]  # narrow apex, wide base


def test_shape_recolour_changes_only_that_shape() -> None:
    scene = Scene(
        "blue",
        "checks",
        (Shape("circle", "red", 0.3, 0.3, 0.15), Shape("square", "white", 0.7, 0.7, 0.15)),
    )
    edit = shapes.recolour_shape(scene, "circle", "green")
    assert edit.instruction == "make the circle green"
    before, after = shapes.render(edit.before), shapes.render(edit.after)
    circle = shapes.silhouette(Scene("blue", "checks", scene.shapes[:1])) > 0
    changed = np.any(before != after, axis=2)
    assert changed.any() and not changed[~circle].any()
    assert nearest_colour(after[19, 19].astype(int)) == "green"


def test_background_recolour_keeps_shapes_and_texture() -> None:
    scene = Scene("blue", "stripes", (Shape("triangle", "orange", 0.5, 0.5, 0.25),))
    edit = shapes.recolour_background(scene, "yellow")
    assert edit.instruction == "make the background yellow"
    before, after = shapes.render(edit.before), shapes.render(edit.after)
    mask = shapes.silhouette(scene)
    np.testing.assert_array_equal(before[mask > 0.99], after[mask > 0.99])
    outside = mask < 0.01
    assert np.all(np.any(before[outside] != after[outside], axis=1))
    # The texture pattern (which pixels are the full tone) is the same in both.
    tone_before = before[outside].sum(axis=1) > before[outside].sum(axis=1).mean()
    tone_after = after[outside].sum(axis=1) > after[outside].sum(axis=1).mean()
    np.testing.assert_array_equal(tone_before, tone_after)


def test_random_edits_name_a_new_colour() -> None:
    rng = random.Random(7)
    for _ in range(40):
        edit = shapes.random_edit(rng)
        words = edit.instruction.split()
        assert words[:2] == ["make", "the"]
        colour = words[-1]
        used = {edit.before.background} | {s.colour for s in edit.before.shapes}
        assert colour in PALETTE and colour not in used
        if words[2] == "background":
            assert edit.after.background == colour and edit.after.shapes == edit.before.shapes
        else:
            assert edit.after.background == edit.before.background
            assert all(s.colour == colour for s in edit.after.shapes if s.kind == words[2])


def test_video_moves_shapes_and_camera() -> None:
    scene = Scene("white", "checks", (Shape("circle", "red", 0.3, 0.5, 0.15),))
    video = shapes.render_video(scene, 3, velocity=(0.125, 0.0))
    assert video.shape == (3, 64, 64, 3)
    centres = []
    for frame in video:
        red = np.all(np.abs(frame.astype(int) - PALETTE["red"]) <= 1, axis=2)
        centres.append(np.nonzero(red)[1].mean())
    np.testing.assert_allclose(np.diff(centres), [8.0, 8.0], atol=0.5)  # 0.125 * 64 px
    panned = shapes.render_video(Scene("white", "checks", ()), 2, camera_velocity=(0.125, 0))
    np.testing.assert_array_equal(panned[1][:, :-8], panned[0][:, 8:])
