"""The job's size: the model's native pixel count at the scene's aspect ratio, by default.

No bpy here; the rounding and the native size at an aspect are the backend protocol's own
(``round_to_8``, ``resolve_size``), so the panel shows the size a job without one gets. A
model makes its best pictures near the pixel count it was trained at (SD 1.x:
512x512); far above it subjects repeat and memory and time grow with the pixel count. The
add-on cannot load a model to ask (no torch in Blender), so the native side comes from:

1. a small table for the built-in models (their size is fixed by this repository);
2. a local diffusers folder's ``unet/config.json`` (``sample_size`` latent pixels times the
   VAE's factor, from ``vae/config.json``), read as plain JSON;
3. a local single-file checkpoint's family (its tensor names, read from the .safetensors
   header by the protocol's ``family_of_path``): 512 (SD 1.x), 768 (SD 2.x), 1024 (SDXL);
4. otherwise 512, the SD 1.x size.

The model's family (SD 1.x, 2.x, SDXL) comes from the same files (``model_family``), never
from the model's name: a hub id not on disk has none to show.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import backend_paths

# Native square side in pixels of the built-in models, by name prefix.
BUILTIN_SIDES = {"builtin:tiny": 64, "builtin:shapes": 64}
# The built-in models' families, longest prefix first (their architecture is fixed here).
BUILTIN_FAMILIES = (
    ("builtin:tiny-xl", "sdxl"),
    ("builtin:tiny-sd2", "sd2"),
    ("builtin:tiny", "sd1"),
    ("builtin:shapes-xl", "sdxl"),
    ("builtin:shapes", "sd1"),
)
DEFAULT_SIDE = 512
# The smallest side a job may have (the protocol's round_to_8 floor).
MIN_SIDE = 64
# Above this many times the native pixel count the panel warns (the threshold).
OVERSIZE_FACTOR = 2.0
# A result whose aspect differs from the scene's by less than this (rounding to multiples
# of 8) fills the frame; a clearly different aspect is fitted whole (letterboxed).
SAME_ASPECT_TOLERANCE = 0.02


def round_to_8(value: float) -> int:
    """``value`` rounded to the nearest multiple of 8 within the job schema's side range."""
    return backend_paths.load_protocol().round_to_8(value)


def _folder_side(folder: Path) -> int | None:
    """The native side of a local diffusers folder from its configs, or None."""
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    sample = unet.get("sample_size")
    if isinstance(sample, list):
        sample = sample[0] if sample else None
    if not isinstance(sample, int) or sample <= 0:
        return None
    factor = 8
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return sample * factor


def native_side(model: str) -> int:
    """The side of the square a model was trained at, in pixels (see the module docstring)."""
    name = (model or "").strip()
    for prefix, side in BUILTIN_SIDES.items():
        if name.startswith(prefix):
            return side
    if name:
        path = Path(os.path.expanduser(name))
        if path.is_dir():
            return _folder_side(path) or DEFAULT_SIDE
        if path.is_file():
            family = backend_paths.load_protocol().family_of_path(path)
            return backend_paths.load_protocol().FAMILY_SIDES.get(family, DEFAULT_SIDE)
    return DEFAULT_SIDE


def model_family(model: str) -> str | None:
    """The family key (sd1, sd2, sdxl) of a built-in model or a local folder or
    .safetensors file, read from its files; None when nothing on disk tells."""
    name = (model or "").strip()
    for prefix, family in BUILTIN_FAMILIES:
        if name.startswith(prefix):
            return family
    if not name:
        return None
    path = Path(os.path.expanduser(name))
    try:
        return backend_paths.load_protocol().family_of_path(path)
    except OSError:
        return None


def family_label(model: str) -> str | None:
    """The family of ``model`` for people ("SDXL"), or None when it cannot be read."""
    family = model_family(model)
    return None if family is None else backend_paths.load_protocol().FAMILY_LABELS[family]


def native_size(aspect_x: float, aspect_y: float, side: int) -> tuple[int, int]:
    """(width, height), multiples of 8, holding about side * side pixels at aspect x:y."""
    if aspect_x <= 0 or aspect_y <= 0:
        raise ValueError(f"aspect must be positive, got {aspect_x}x{aspect_y}")
    aspect = aspect_x / aspect_y
    width, height = backend_paths.load_protocol().resolve_size(None, None, aspect, side)
    # A short side raised to the minimum raises the long side with it: the aspect stays.
    if min(width, height) <= MIN_SIDE:
        if aspect >= 1.0:
            width, height = round_to_8(MIN_SIDE * aspect), MIN_SIDE
        else:
            width, height = MIN_SIDE, round_to_8(MIN_SIDE / aspect)
    return width, height


def scene_size(resolution_x: int, resolution_y: int, percentage: int = 100) -> tuple[int, int]:
    """The job size for a scene's render resolution: scaled, then multiples of 8."""
    scale = percentage / 100.0
    return round_to_8(resolution_x * scale), round_to_8(resolution_y * scale)


def pixel_ratio(width: int, height: int, side: int) -> float:
    """How many times the native pixel count ``width`` x ``height`` is."""
    return width * height / float(side * side)


def is_oversize(width: int, height: int, side: int) -> bool:
    """True above OVERSIZE_FACTOR times the native pixel count (the panel warns)."""
    return pixel_ratio(width, height, side) > OVERSIZE_FACTOR


def fit_method(width: int, height: int, frame_x: int, frame_y: int) -> str:
    """Blender's fit method for a result strip: FILL at the frame's aspect, else FIT."""
    aspect, frame = width / height, frame_x / frame_y
    return "FILL" if abs(aspect / frame - 1.0) < SAME_ASPECT_TOLERANCE else "FIT"
