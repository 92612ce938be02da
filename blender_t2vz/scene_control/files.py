"""Files the passes write: PNG frames, arrays and JSON, each written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import bpy
import numpy as np

from .errors import SceneControlError


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save_arrays(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    os.replace(tmp, path)


def write_png(path: str | os.PathLike, pixels: np.ndarray, bits: int = 8) -> Path:
    """Write a (H, W) or (H, W, 3) float image in 0..1 (top row first) as an RGB PNG."""
    if bits not in (8, 16):
        raise SceneControlError(f"PNG bit depth must be 8 or 16, got {bits}")
    pixels = np.clip(np.asarray(pixels, np.float32), 0.0, 1.0)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    height, width = pixels.shape[:2]
    rgba = np.ones((height, width, 4), np.float32)
    rgba[:, :, :3] = pixels[::-1]  # Blender images store the bottom row first
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = bpy.data.images.new("_t2vz_png", width, height, alpha=False, float_buffer=bits == 16)
    try:
        if bits == 16:
            image.colorspace_settings.name = "Non-Color"
        image.pixels.foreach_set(rgba.ravel())
        image.file_format = "PNG"
        part = path.with_name(path.name + ".part")  # not an image suffix: never read as a frame
        image.filepath_raw = str(part)
        image.save()
        os.replace(part, path)
    finally:
        bpy.data.images.remove(image)
    return path


def _frame_name(index: int) -> str:
    return f"frame_{index + 1:05d}.png"


def _sequence_paths(out_dir: Path, count: int) -> list[Path]:
    """frame_00001.png .. for ``count`` frames; stale frames beyond are removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = {_frame_name(i) for i in range(count)}
    for stale in out_dir.glob("frame_*.png"):
        if stale.name not in keep:
            stale.unlink()
    return [out_dir / _frame_name(i) for i in range(count)]


def _check_frames(frames: Sequence[int]) -> list[int]:
    frames = list(frames)
    if not frames:
        raise SceneControlError("the frame range is empty")
    for f in frames:
        if isinstance(f, bool) or not isinstance(f, int):
            raise SceneControlError(f"frame must be a whole number, got {f!r}")
    return frames


def _abs(path: str | os.PathLike) -> Path:
    return Path(bpy.path.abspath(str(path)))


def _read_png(path: str | os.PathLike) -> np.ndarray:
    """The RGB pixels of an image file as a (H, W, 3) float array in 0..1, bottom row first."""
    image = bpy.data.images.load(str(path), check_existing=False)
    try:
        width, height = image.size
        rgba = np.empty(width * height * 4, np.float32)
        image.pixels.foreach_get(rgba)
    finally:
        bpy.data.images.remove(image)
    return rgba.reshape(height, width, 4)[:, :, :3]  # (H, W, RGBA) -> RGB


def _load(path: Path, name: str) -> np.ndarray:
    with np.load(path) as data:
        return data[name]
