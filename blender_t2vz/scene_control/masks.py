"""Foreground masks (white) for background smoothing, from the alpha and Z passes."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import bpy
import numpy as np

from .errors import SceneControlError
from .files import _abs, _load, _sequence_paths, write_png
from .passes import BACKGROUND_Z, render_pass_frames


def _with_children(objects: Iterable) -> list:
    """The objects and all their descendants (a rig and its meshes), without duplicates."""
    out: dict[str, object] = {}
    for obj in objects:
        for o in (obj, *obj.children_recursive):
            out[o.name] = o
    return list(out.values())


def foreground_mask(full_z: np.ndarray, alpha: np.ndarray, fg_z: np.ndarray | None) -> np.ndarray:
    """1 where the foreground is visible: any hit, or the chosen objects where unoccluded."""
    if fg_z is None:
        return (alpha > 0.5).astype(np.float32)
    visible = (fg_z < BACKGROUND_Z) & (fg_z <= full_z * 1.01 + 1e-4)
    return visible.astype(np.float32)


def render_mask_frames(
    scene,
    folder: str | os.PathLike,
    frames: Sequence[int],
    width: int,
    height: int,
    foreground: Sequence | None = None,
    camera=None,
    cache: str | os.PathLike | None = None,
) -> list[Path]:
    """Foreground masks (white) in folder/masks: all geometry, or the chosen objects."""
    full = render_pass_frames(scene, folder, frames, width, height, "z", camera, cache=cache)
    chosen = None
    if foreground:
        objs = [bpy.data.objects.get(o) if isinstance(o, str) else o for o in foreground]
        missing = [n for n, o in zip(foreground, objs, strict=True) if o is None]
        if missing:
            raise SceneControlError(f"no foreground object named {missing[0]!r}")
        fg = render_pass_frames(
            scene, folder, frames, width, height, "z", camera, _with_children(objs), cache=cache
        )
        chosen = [_load(p, "z") for p in fg]
    paths = _sequence_paths(_abs(folder) / "masks", len(full))
    for i, (path, cached) in enumerate(zip(paths, full, strict=True)):
        fg_z = None if chosen is None else chosen[i]
        mask = foreground_mask(_load(cached, "z"), _load(cached, "alpha"), fg_z)
        write_png(path, mask)
    return paths
