"""The pass cache: files keyed by a hash of everything a rendered pass depends on.

Rendered passes are cached by a hash of what affects them (frame, camera, evaluated object
transforms and geometry, settings), so unchanged frames are reused; entries not used for a
while are pruned.
"""

from __future__ import annotations

import hashlib
import os
import struct
from array import array
from pathlib import Path

from .files import _abs

CACHE_VERSION = "2"  # 2: renders follow the frame (1 rendered the context scene's frame)


def _floats(values) -> bytes:
    return struct.pack(f"<{len(values)}d", *values)


def _matrix_bytes(matrix) -> bytes:
    return _floats([v for row in matrix for v in row])


def _geometry_bytes(obj_eval) -> bytes:
    """A digest of an evaluated object's geometry (vertex positions for meshes)."""
    h = hashlib.sha1(obj_eval.type.encode())
    data = obj_eval.data
    if obj_eval.type == "MESH" and data is not None:
        coords = array("f", bytes(4 * 3 * len(data.vertices)))
        data.vertices.foreach_get("co", coords)
        h.update(coords.tobytes())
        h.update(struct.pack("<2q", len(data.polygons), len(data.edges)))
        h.update(repr([m.name if m else "" for m in data.materials]).encode())
    else:
        h.update(_floats([c for corner in obj_eval.bound_box for c in corner]))
    return h.digest()


def _camera_bytes(cam_eval) -> bytes:
    data = cam_eval.data
    params = (
        data.type,
        data.lens,
        data.ortho_scale,
        data.sensor_width,
        data.sensor_height,
        data.sensor_fit,
        data.shift_x,
        data.shift_y,
        data.clip_start,
        data.clip_end,
    )
    return _matrix_bytes(cam_eval.matrix_world) + repr(params).encode()


def scene_state_key(dg, cam_eval, frame: int, settings: str) -> str:
    """Hash of everything a pass depends on: frame, camera, objects, geometry, settings."""
    h = hashlib.sha1(f"t2vz-scene-{CACHE_VERSION}|{frame}|{settings}".encode())
    h.update(_camera_bytes(cam_eval))
    geometry: dict[str, bytes] = {}
    for inst in dg.object_instances:
        obj = inst.object
        h.update(f"{obj.name}|{obj.type}|{inst.is_instance}|{obj.hide_render}".encode())
        h.update(_matrix_bytes(inst.matrix_world))
        skip = obj.type in ("LIGHT", "CAMERA", "EMPTY", "LIGHT_PROBE", "SPEAKER")
        if not skip and obj.name not in geometry:
            geometry[obj.name] = _geometry_bytes(obj)
    for key in sorted(geometry):
        h.update(key.encode() + geometry[key])
    return h.hexdigest()


def cache_dir(folder: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """The pass cache: ``cache`` if given, else ``<folder>/cache`` (created)."""
    path = _abs(cache) if cache is not None else _abs(folder) / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def prune_cache(cache: str | os.PathLike, used_since: float) -> int:
    """Delete cached passes not written or reused since ``used_since`` (a time.time())."""
    removed = 0
    folder = _abs(cache)
    if not folder.is_dir():
        return 0
    for path in folder.iterdir():
        if path.is_file() and path.stat().st_mtime < used_since:
            path.unlink()
            removed += 1
    return removed
