"""The edge passes: Freestyle lines (white on black) or a flat pass for the backend's canny."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from .errors import SceneControlError
from .files import _abs, _load, _sequence_paths, write_png
from .passes import render_pass_frames


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

    ``allow_empty=False``: Freestyle lines that draw nothing at any frame are an error.
    """
    method = edge_method(scene, kind)
    root = _abs(folder)
    if method == "canny":
        cached = render_pass_frames(
            scene, folder, frames, width, height, "flat", camera, cache=cache
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
