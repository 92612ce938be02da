"""The synthetic world of the built-in ``builtin:shapes`` models: coloured shapes on textured
backgrounds, drawn with numpy, with the prompts and edit instructions that describe them.

The training script draws its data here, and the quality benchmark and the tests draw their
control and source videos and read the palette here, so the models, the benchmark and the
tests agree on one world:

* prompts: ``"a red circle on a blue background"`` or, with two shapes,
  ``"a red circle and a green square on a blue background"``;
* edits (Video Instruct-Pix2Pix): ``"make the circle green"``, ``"make the background yellow"``;
* backgrounds carry a texture in shades of their colour (stripes, checks or noise), fixed to
  the world, so a camera pan moves it;
* positions are fractions of the frame (x right, y down), so any size renders the same scene.

Standard library and numpy only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

# Colours the models know, as sRGB. Far apart in RGB so a pixel's nearest palette colour is
# unambiguous; textured backgrounds use darker shades of these (see SHADE).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "purple": (140, 40, 190),
    "orange": (250, 140, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TEXTURES: tuple[str, ...] = ("stripes", "checks", "noise")
# Brightness of a background's texture: its two tones are SHADE * colour and colour.
SHADE = 0.6
# Texture period in fractions of the frame width: about 1/4 of a 64 px frame (16 px),
# two latent pixels at SD's 8x VAE factor, so a camera pan is visible in the latents.
TEXTURE_PERIOD = 0.25
# Shape sizes (half the bounding box) in fractions of the frame's shorter side.
SIZE_RANGE = (0.14, 0.3)
# Supersampling per axis: anti-aliased edges at any size.
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    """One flat-coloured shape; ``x``, ``y`` its centre and ``size`` its half-extent."""

    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    x: float  # centre, fraction of the width (0 left, 1 right)
    y: float  # centre, fraction of the height (0 top, 1 bottom)
    size: float  # half the bounding box, fraction of the shorter side


@dataclass(frozen=True)
class Scene:
    """A textured background and the shapes in front of it, back to front."""

    background: str  # one of COLOURS
    texture: str  # one of TEXTURES
    shapes: tuple[Shape, ...]
    texture_seed: int = 0  # picks the noise texture; stripes and checks ignore it

    def prompt(self) -> str:
        """The text prompt that describes this scene."""
        things = " and ".join(f"a {s.colour} {s.kind}" for s in self.shapes)
        return f"{things} on a {self.background} background"


def check_scene(scene: Scene) -> None:
    """Raise ValueError naming the first unknown colour, shape or texture."""
    if scene.background not in PALETTE:
        raise ValueError(f"unknown background colour {scene.background!r}; choose from {COLOURS}")
    if scene.texture not in TEXTURES:
        raise ValueError(f"unknown texture {scene.texture!r}; choose from {TEXTURES}")
    for shape in scene.shapes:
        if shape.kind not in SHAPES:
            raise ValueError(f"unknown shape {shape.kind!r}; choose from {SHAPES}")
        if shape.colour not in PALETTE:
            raise ValueError(f"unknown shape colour {shape.colour!r}; choose from {COLOURS}")


# ---------------------------------------------------------------------------- drawing


def _sample_grid(width: int, height: int, camera: tuple[float, float]) -> tuple:
    """World coordinates (u, v) of supersampled pixel centres, in fractions of the width.

    ``camera`` moves the view: content appears shifted by -camera (fractions of the frame).
    """
    s = SUPERSAMPLE
    xs = (np.arange(width * s) + 0.5) / (width * s) + camera[0]
    ys = ((np.arange(height * s) + 0.5) / (height * s) + camera[1]) * height / width
    return np.meshgrid(xs, ys, indexing="xy")  # (H*s, W*s) each


def _noise_texture(u: np.ndarray, v: np.ndarray, seed: int) -> np.ndarray:
    """Smooth value noise in [0, 1], periodic over 4 texture periods, fixed to the world."""
    cells = 8
    grid = np.random.default_rng(seed).random((cells, cells))
    gu = u / TEXTURE_PERIOD * 2 % cells
    gv = v / TEXTURE_PERIOD * 2 % cells
    i0, j0 = np.floor(gu).astype(int), np.floor(gv).astype(int)
    fu, fv = gu - i0, gv - j0
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)  # smoothstep
    i1, j1 = (i0 + 1) % cells, (j0 + 1) % cells
    top = grid[j0, i0] * (1 - fu) + grid[j0, i1] * fu
    bottom = grid[j1, i0] * (1 - fu) + grid[j1, i1] * fu
    return top * (1 - fv) + bottom * fv


def _texture(texture: str, u: np.ndarray, v: np.ndarray, seed: int) -> np.ndarray:
    """Texture tone in [0, 1] at world coordinates (1 = the full colour)."""
    if texture == "stripes":  # diagonal stripes
        return (np.floor((u + v) / (TEXTURE_PERIOD / 2 * math.sqrt(2))) % 2).astype(np.float32)
    if texture == "checks":
        cell = TEXTURE_PERIOD / 2
        return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    return (_noise_texture(u, v, seed) > 0.5).astype(np.float32)


def _shape_mask(shape: Shape, u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
    """Boolean coverage of one shape at world coordinates (aspect = height / width)."""
    half = shape.size * min(1.0, aspect)  # in fractions of the width
    dx = u - shape.x
    dy = v - shape.y * aspect
    if shape.kind == "circle":
        return dx * dx + dy * dy <= half * half
    if shape.kind == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # An upright isosceles triangle filling its bounding box: apex on top, base at the bottom.
    inside_y = (dy >= -half) & (dy <= half)
    return inside_y & (np.abs(dx) <= (dy + half) / 2)


def _downsample(image: np.ndarray) -> np.ndarray:
    """Average SUPERSAMPLE x SUPERSAMPLE blocks: (H*s, W*s, C) -> (H, W, C)."""
    s = SUPERSAMPLE
    h, w = image.shape[0] // s, image.shape[1] // s
    return image.reshape(h, s, w, s, -1).mean(axis=(1, 3))  # (H, W, C)


def render(
    scene: Scene, width: int = 64, height: int = 64, camera: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """The scene as an RGB uint8 image (height, width, 3), seen through a panned camera."""
    check_scene(scene)
    u, v = _sample_grid(width, height, camera)
    aspect = height / width
    bg = np.asarray(PALETTE[scene.background], dtype=np.float32)
    tone = _texture(scene.texture, u, v, scene.texture_seed)[..., None]  # (H*s, W*s, 1)
    image = bg * (SHADE + (1 - SHADE) * tone)  # (H*s, W*s, 3)
    for shape in scene.shapes:
        mask = _shape_mask(shape, u, v, aspect)[..., None]
        image = np.where(mask, np.asarray(PALETTE[shape.colour], dtype=np.float32), image)
    return np.clip(_downsample(image).round(), 0, 255).astype(np.uint8)


def silhouette(
    scene: Scene, width: int = 64, height: int = 64, camera: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """Foreground coverage in [0, 1] (height, width): 1 inside any shape."""
    u, v = _sample_grid(width, height, camera)
    mask = np.zeros(u.shape, dtype=np.float32)
    for shape in scene.shapes:
        mask = np.maximum(mask, _shape_mask(shape, u, v, height / width))
    return _downsample(mask[..., None])[..., 0]


# ---------------------------------------------------------------------------- sampling


def random_shape(rng: random.Random, exclude: Sequence[str] = ()) -> Shape:
    """A shape of random kind, colour (not in ``exclude``), size and position inside the frame."""
    size = rng.uniform(*SIZE_RANGE)
    margin = size * 0.8  # mostly inside the frame
    return Shape(
        kind=rng.choice(SHAPES),
        colour=rng.choice([c for c in COLOURS if c not in exclude]),
        x=rng.uniform(margin, 1 - margin),
        y=rng.uniform(margin, 1 - margin),
        size=size,
    )


def random_scene(rng: random.Random, two_shapes: float = 0.25) -> Scene:
    """A random scene: one shape, or two with probability ``two_shapes``."""
    background = rng.choice(COLOURS)
    first = random_shape(rng, exclude=[background])
    shapes = [first]
    if rng.random() < two_shapes:
        shapes.append(random_shape(rng, exclude=[background, first.colour]))
    return Scene(background, rng.choice(TEXTURES), tuple(shapes), rng.randrange(2**31))


def scene_from_prompt(prompt: str, rng: random.Random | None = None) -> Scene:
    """A scene matching ``"a {colour} {shape} on a {colour} background"`` (one or two shapes);
    position, size and texture are drawn from ``rng`` (centred, medium size without one)."""
    words = prompt.lower().replace(",", " ").split()
    try:
        on = words.index("on")
        background = words[on + 2]
    except (ValueError, IndexError):
        raise ValueError(
            f"prompt {prompt!r} is not 'a COLOUR SHAPE on a COLOUR background'"
        ) from None
    shapes = []
    for i, word in enumerate(words[:on]):
        if word in SHAPES and i > 0:
            if rng is None:
                shapes.append(Shape(word, words[i - 1], 0.5, 0.5, 0.25))
            else:
                shapes.append(replace(random_shape(rng), kind=word, colour=words[i - 1]))
    texture = rng.choice(TEXTURES) if rng else "stripes"
    scene = Scene(background, texture, tuple(shapes), rng.randrange(2**31) if rng else 0)
    if not shapes:
        raise ValueError(f"prompt {prompt!r} names no shape; shapes are {SHAPES}")
    check_scene(scene)
    return scene


# ---------------------------------------------------------------------------- edits


@dataclass(frozen=True)
class Edit:
    """An Instruct-Pix2Pix training pair: ``instruction`` turns ``before`` into ``after``."""

    instruction: str
    before: Scene
    after: Scene


def recolour_shape(scene: Scene, kind: str, colour: str) -> Edit:
    """``"make the {kind} {colour}"``: every shape of that kind takes the colour."""
    shapes = tuple(replace(s, colour=colour) if s.kind == kind else s for s in scene.shapes)
    return Edit(f"make the {kind} {colour}", scene, replace(scene, shapes=shapes))


def recolour_background(scene: Scene, colour: str) -> Edit:
    """``"make the background {colour}"``: the background takes the colour, texture kept."""
    return Edit(f"make the background {colour}", scene, replace(scene, background=colour))


def random_edit(rng: random.Random) -> Edit:
    """A random scene and a random edit of it (shape or background, to a new colour)."""
    scene = random_scene(rng)
    used = {scene.background} | {s.colour for s in scene.shapes}
    colour = rng.choice([c for c in COLOURS if c not in used])
    if rng.random() < 0.5:
        return recolour_shape(scene, rng.choice(scene.shapes).kind, colour)
    return recolour_background(scene, colour)


# ---------------------------------------------------------------------------- videos


def moving_scene(scene: Scene, frame: int, velocity: tuple[float, float]) -> Scene:
    """The scene at ``frame`` with every shape moved by ``frame * velocity`` (fractions)."""
    shapes = tuple(
        replace(s, x=s.x + frame * velocity[0], y=s.y + frame * velocity[1]) for s in scene.shapes
    )
    return replace(scene, shapes=shapes)


def render_video(
    scene: Scene,
    frames: int,
    width: int = 64,
    height: int = 64,
    velocity: tuple[float, float] = (0.0, 0.0),
    camera_velocity: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """(frames, height, width, 3) uint8: shapes moving by ``velocity`` and the camera panning
    by ``camera_velocity`` per frame (fractions of the frame)."""
    return np.stack(
        [
            render(
                moving_scene(scene, k, velocity),
                width,
                height,
                (k * camera_velocity[0], k * camera_velocity[1]),
            )
            for k in range(frames)
        ]
    )
