"""The Vector pass: Blender's exact screen-space motion, for flow-guided consistency.

One Cycles render per frame writes the Z, alpha and Vector passes together; the cache keeps
them in one entry and also files the Z and alpha under the depth pass's key, so the depth
and mask controls of the same job reuse that render instead of rendering again.

A frame's vectors depend on the scene one frame before and after it, so its cache key
hashes the state of those three frames.

The backend reads a folder of ``.npy`` frames (backend/media/flow.py, ``FileFlows``): each
(H, W, 4) float32, a pixel's offset to its position in the previous frame, then to its
position in the next one, in pixels, x right and y down. Cycles writes Vector.X/Y as the
offset to the previous position and Z/W as the current position minus the next one, y up
(measured on a rendered moving cube: tests/addon/scene_control/test_vector_pass.py), so the
backend's layout is (X, -Y, -Z, W). The backend finds occluded pixels by forward-backward
consistency of these vectors; it takes no depth input for that.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .cache import cache_dir, scene_state_key
from .errors import SceneControlError
from .exr import exr_pass, read_exr
from .files import _abs, _check_frames, _load, _save_arrays
from .passes import _configure_z
from .scene import _render_layer, _render_still, _set_frame, temporary_scene


def vector_flow(channels: dict[str, np.ndarray], layer: str) -> np.ndarray:
    """(H, W, 4) float32 in the backend's layout from a render's Vector pass: (X, -Y, -Z, W)."""
    x, y, z, w = (exr_pass(channels, layer, f"Vector.{c}") for c in "XYZW")
    return np.stack([x, -y, -z, w], axis=-1).astype(np.float32)  # (H, W, 4), y down


def _configure_vector(tmp) -> None:
    """The depth pass's render (Cycles, Z and alpha, multilayer OpenEXR) plus the Vector pass."""
    _configure_z(tmp)
    # temporary_scene turns motion blur off: with it on, Cycles writes no Vector pass.
    tmp.view_layers[_render_layer(tmp)].use_pass_vector = True


def _check_camera(camera, moves: bool, frame: int) -> None:
    """Refuse a moving orthographic camera: Cycles' vectors for it are wrong (measured: a
    camera sliding 6.4 px a frame over a still cube gave -8.2 to 3.2 px across the cube;
    a perspective camera's agree with the motion exactly, tests/addon/scene_control/
    test_vectors.py)."""
    if moves and camera.data.type == "ORTHO":
        raise SceneControlError(
            f"camera {camera.name!r} is orthographic and moves around frame {frame}: "
            "Blender's motion vectors are wrong for it; use a perspective camera, or "
            "consistency Paper"
        )


def _frame_keys(tmp, frame: int, config: str) -> tuple[str, str]:
    """(vector key, depth key) of a frame; leaves the scene evaluated at ``frame``."""
    states, views = {}, set()
    for f in (frame - 1, frame + 1, frame):  # the frame itself last: it is the one rendered
        dg = _set_frame(tmp, f)
        camera = tmp.camera.evaluated_get(dg)
        states[f] = scene_state_key(dg, camera, f, f"vector|{config}")
        views.add(tuple(round(v, 9) for row in camera.matrix_world for v in row))
    _check_camera(tmp.camera, len(views) > 1, frame)
    depth_key = scene_state_key(dg, tmp.camera.evaluated_get(dg), frame, f"z|{config}")
    joined = "|".join(states[f] for f in (frame - 1, frame, frame + 1))
    return hashlib.sha1(joined.encode()).hexdigest(), depth_key


def render_vector_frames(
    scene,
    folder: str | os.PathLike,
    frames: Sequence[int],
    width: int,
    height: int,
    camera=None,
    cache: str | os.PathLike | None = None,
) -> list[Path]:
    """Render (or reuse) the Z, alpha and Vector passes of each frame; the cached .npz files.

    Each holds ``z``, ``alpha`` and ``vectors`` ((H, W, 4), see ``vector_flow``). The Z and
    alpha also go into the cache under the depth pass's key (``render_pass_frames`` "z").
    """
    frames, cache = _check_frames(frames), cache_dir(folder, cache)
    with temporary_scene(scene, width, height, camera) as tmp:
        _configure_vector(tmp)
        layer = _render_layer(tmp)
        config = f"{width}x{height}|{layer}||"  # as render_pass_frames: no object subset
        out, scratch = [], Path(tempfile.mkdtemp(prefix="t2vz_vector_"))
        try:
            for frame in frames:
                vector_key, depth_key = _frame_keys(tmp, frame, config)
                cached, depth = cache / f"{vector_key}.npz", cache / f"{depth_key}.npz"
                if cached.is_file():
                    os.utime(cached)  # marks it used for prune_cache
                    if not depth.is_file():
                        _save_arrays(depth, z=_load(cached, "z"), alpha=_load(cached, "alpha"))
                else:
                    channels = read_exr(_render_still(tmp, scratch / "frame.exr"))
                    z = exr_pass(channels, layer, "Depth.Z")
                    alpha = exr_pass(channels, layer, "Combined.A")
                    _save_arrays(cached, z=z, alpha=alpha, vectors=vector_flow(channels, layer))
                    if not depth.is_file():
                        _save_arrays(depth, z=z, alpha=alpha)
                out.append(cached)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return out


def _save_npy(path: Path, array: np.ndarray) -> Path:
    """Write one array as .npy atomically (a .part file renamed into place)."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    os.replace(tmp, path)
    return path


def render_flow_frames(
    scene,
    folder: str | os.PathLike,
    frames: Sequence[int],
    width: int,
    height: int,
    camera=None,
    cache: str | os.PathLike | None = None,
) -> Path:
    """The job's motion-vector folder ``folder``: frame_00001.npy .. one a frame, in order,
    each (height, width, 4) float32 as the backend's ``flow_source`` reads them (the default
    pass cache, ``<folder>/cache``, is a subfolder the backend does not read)."""
    cached = render_vector_frames(scene, folder, frames, width, height, camera, cache)
    out = _abs(folder)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"frame_{i + 1:05d}.npy" for i in range(len(cached))]
    for stale in out.glob("frame_*.npy"):  # a reused folder: the backend reads them all
        if stale.name not in names:
            stale.unlink()
    for name, path in zip(names, cached, strict=True):
        _save_npy(out / name, _load(path, "vectors"))
    return out
