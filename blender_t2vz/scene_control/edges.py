"""The edge passes: Freestyle lines (white on black) or a flat pass for the backend's canny."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import SceneControlError
from .files import _abs, _load, _read_png, _sequence_paths, write_png
from .passes import render_pass_frames

# How far a flat pass of the background alone spreads: the render's dither noise. Measured
# on an empty 64x64 Workbench frame (Blender 5.0.1, dither 1.0): values 0 and 1 of 255; a
# mesh in view spreads tens of levels (63 to 232 for the default cube).
DITHER_SPREAD = 2.0 / 255.0


def shows_something(pixels: np.ndarray, spread: float = DITHER_SPREAD) -> bool:
    """True when a flat-shaded frame is more than one colour plus dither: some surface is
    in view (the background alone is the world's flat colour, where canny finds no edge)."""
    flat = pixels.reshape(-1, pixels.shape[-1])  # (H, W, C) -> (H * W, C)
    return bool((flat.max(axis=0) - flat.min(axis=0) > spread).any())


def edge_method(scene, kind: str = "edges") -> str:
    """ "lines" (Freestyle) or "canny" (Workbench pass): "edges" picks by scene Freestyle."""
    if kind == "edges":
        return "lines" if scene.render.use_freestyle else "canny"
    if kind not in ("lines", "canny"):
        raise SceneControlError(f"unknown edge kind {kind!r}; use edges, lines or canny")
    return kind


def render_edge_frames(
    scene,
    folder: str | os.PathLike,
    frames: Sequence[int],
    width: int,
    height: int,
    kind: str = "edges",
    camera=None,
    cache: str | os.PathLike | None = None,
    allow_empty: bool = True,
) -> tuple[list[Path], str]:
    """Edge frames in folder/<method>; the paths and the backend detector to apply.

    ``allow_empty=False``: Freestyle lines that draw nothing at any frame, or a flat pass
    of one colour at every frame (nothing in the camera's view), are an error.
    """
    method = edge_method(scene, kind)
    root = _abs(folder)
    if method == "canny":
        cached = render_pass_frames(
            scene, folder, frames, width, height, "flat", camera, cache=cache
        )
        if not allow_empty and not any(shows_something(_read_png(src)) for src in cached):
            raise SceneControlError(
                f"the flat pass shows no surface at frames {frames[0]} to {frames[-1]}: "
                "canny would find no edge in it (an armature alone renders nothing; give "
                "the character a mesh, or use the OpenPose pass)"
            )
        paths = _sequence_paths(root / "canny", len(cached))
        for src, dst in zip(cached, paths, strict=True):
            shutil.copyfile(src, dst)
        return paths, "canny"
    cached = render_pass_frames(scene, folder, frames, width, height, "lines", camera, cache=cache)
    lines = [_load(src, "lines") for src in cached]
    if not allow_empty and not any(bool((image > 0).any()) for image in lines):
        raise SceneControlError(
            f"Freestyle draws no line at frames {frames[0]} to {frames[-1]}: the edge pass "
            "would be all black (is a mesh in the camera's view?)"
        )
    paths = _sequence_paths(root / "lines", len(cached))
    for image, dst in zip(lines, paths, strict=True):
        write_png(dst, image)
    return paths, "none"
