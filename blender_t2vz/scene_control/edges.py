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
) -> tuple[list[Path], str]:
    """Edge frames in folder/<method>; the paths and the backend detector to apply."""
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
    paths = _sequence_paths(root / "lines", len(cached))
    for src, dst in zip(cached, paths, strict=True):
        write_png(dst, _load(src, "lines"))
    return paths, "none"
