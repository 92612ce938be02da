"""The depth pass: inverse depth, near bright, normalised over the whole shot (MiDaS-like)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import SceneControlError
from .files import _abs, _load, _sequence_paths, write_png
from .passes import BACKGROUND_Z, render_pass_frames

# Depth value of the farthest surface of a shot, keeping it apart from the empty background.
DEPTH_FLOOR = 0.1


def normalize_depth(depths: Sequence[np.ndarray], floor: float = DEPTH_FLOOR) -> list[np.ndarray]:
    """Z maps of a shot -> inverse depth in 0..1, near bright, one min/max for all frames.

    Background (no hit) is 0; the farthest surface of the shot maps to ``floor`` and the
    nearest to 1, so values do not flicker from frame to frame.
    """
    inverse = [np.where(z < BACKGROUND_Z, 1.0 / np.maximum(z, 1e-6), 0.0) for z in depths]
    hits = [inv[inv > 0] for inv in inverse]
    hits = [h for h in hits if h.size]
    if not hits:
        return [np.zeros_like(z, dtype=np.float32) for z in depths]
    lo = min(float(h.min()) for h in hits)
    hi = max(float(h.max()) for h in hits)
    span = hi - lo
    out = []
    for inv in inverse:
        scaled = np.ones_like(inv) if span <= 1e-12 else (inv - lo) / span
        out.append(np.where(inv > 0, floor + (1.0 - floor) * scaled, 0.0).astype(np.float32))
    return out


def render_depth_frames(
    scene,
    folder: str | os.PathLike,
    frames: Sequence[int],
    width: int,
    height: int,
    camera=None,
    floor: float = DEPTH_FLOOR,
    bits: int = 16,
    cache: str | os.PathLike | None = None,
    allow_empty: bool = True,
) -> list[Path]:
    """Depth control frames (inverse depth, near bright, per-shot) as PNGs in folder/depth.

    ``allow_empty=False``: a shot in which the camera sees no surface at any frame (an
    armature alone has none) is an error saying so, not all-black frames.
    """
    cached = render_pass_frames(scene, folder, frames, width, height, "z", camera, cache=cache)
    depths = [_load(p, "z") for p in cached]
    if not allow_empty and not any(bool((z < BACKGROUND_Z).any()) for z in depths):
        raise SceneControlError(
            f"the camera sees no surface at frames {frames[0]} to {frames[-1]}: the depth "
            "pass would be all black (an armature alone renders nothing; give the "
            "character a mesh, or use the OpenPose pass)"
        )
    images = normalize_depth(depths, floor)
    paths = _sequence_paths(_abs(folder) / "depth", len(images))
    return [write_png(p, img, bits) for p, img in zip(paths, images, strict=True)]
