"""The raw render passes (Z and alpha, Freestyle lines, flat shading), cached per frame.

* "z": Cycles at one sample writes the Z pass into a multilayer OpenEXR (depth, masks).
* "lines": Freestyle lines rendered as a pass (edges).
* "flat": a Workbench flat-shaded PNG (edges through the backend's canny).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import bpy

from .cache import cache_dir, scene_state_key
from .errors import SceneControlError
from .exr import exr_pass, read_exr
from .files import _check_frames, _save_arrays
from .scene import (
    _render_layer,
    _render_still,
    _set_frame,
    _use_cycles,
    _use_multilayer_exr,
    temporary_scene,
)

# Cycles writes this Z where a ray hits nothing.
BACKGROUND_Z = 1e9


@dataclass
class _Pass:
    """How one cached pass is configured, rendered and stored."""

    name: str
    suffix: str
    configure: Callable
    store: Callable


def _configure_z(tmp) -> None:
    _use_cycles(tmp)
    layer = tmp.view_layers[_render_layer(tmp)]
    layer.use_pass_z = True
    tmp.render.use_freestyle = False
    _use_multilayer_exr(tmp)


def _store_z(exr: Path, cached: Path, layer: str) -> None:
    channels = read_exr(exr)
    _save_arrays(
        cached,
        z=exr_pass(channels, layer, "Depth.Z"),
        alpha=exr_pass(channels, layer, "Combined.A"),
    )


def _configure_lines(tmp) -> None:
    _use_cycles(tmp)
    tmp.render.use_freestyle = True
    layer = tmp.view_layers[_render_layer(tmp)]
    layer.use_freestyle = True
    settings = layer.freestyle_settings
    settings.as_render_pass = True
    if not settings.linesets:
        settings.linesets.new("t2vz lines")
    for lineset in settings.linesets:
        if lineset.linestyle is None:  # removed with the temporary scene
            lineset.linestyle = bpy.data.linestyles.new("_t2vz_lines")
    _use_multilayer_exr(tmp)


def _store_lines(exr: Path, cached: Path, layer: str) -> None:
    _save_arrays(cached, lines=exr_pass(read_exr(exr), layer, "Freestyle.A"))


def _configure_flat(tmp, lighting: str = "FLAT") -> None:
    tmp.render.engine = "BLENDER_WORKBENCH"
    shading = tmp.display.shading
    shading.light = lighting
    shading.color_type = "RANDOM"
    shading.show_cavity = False
    shading.show_shadows = False
    shading.show_specular_highlight = False
    tmp.display.render_aa = "FXAA"
    tmp.render.film_transparent = False
    tmp.render.use_freestyle = False
    view = tmp.view_settings
    view.view_transform = "Standard"
    view.look = "None"
    view.exposure, view.gamma = 0.0, 1.0
    settings = tmp.render.image_settings
    if hasattr(settings, "media_type"):
        settings.media_type = "IMAGE"
    settings.file_format = "PNG"
    settings.color_mode = "RGB"
    settings.color_depth = "8"


def _store_copy(rendered: Path, cached: Path, layer: str) -> None:
    shutil.copyfile(rendered, cached.with_name(cached.name + ".part"))
    os.replace(cached.with_name(cached.name + ".part"), cached)


PASSES = {
    "z": _Pass("z", ".npz", _configure_z, _store_z),
    "lines": _Pass("lines", ".npz", _configure_lines, _store_lines),
    "flat": _Pass("flat", ".png", _configure_flat, _store_copy),
}


def render_pass_frames(
    scene,
    folder: str | os.PathLike,
    frames: Sequence[int],
    width: int,
    height: int,
    kind: str,
    camera=None,
    objects=None,
    settings: str = "",
    cache: str | os.PathLike | None = None,
) -> list[Path]:
    """Render (or reuse from the cache) one pass per frame; the cached file of each frame.

    kind: "z" (Z and alpha, .npz), "lines" (Freestyle alpha, .npz) or "flat" (Workbench
    PNG). ``objects`` renders only those objects (and the camera) instead of the scene.
    Cached files live in ``cache`` (default ``<folder>/cache``).
    """
    if kind not in PASSES:
        raise SceneControlError(f"unknown pass {kind!r}; use one of {', '.join(PASSES)}")
    spec, frames, cache = PASSES[kind], _check_frames(frames), cache_dir(folder, cache)
    with temporary_scene(scene, width, height, camera, objects) as tmp:
        spec.configure(tmp)
        layer = _render_layer(tmp)
        only = "" if objects is None else ",".join(sorted(o.name for o in objects))
        config = f"{kind}|{width}x{height}|{layer}|{only}|{settings}"
        out, scratch = [], Path(tempfile.mkdtemp(prefix="t2vz_pass_"))
        try:
            for frame in frames:
                dg = _set_frame(tmp, frame)
                key = scene_state_key(dg, tmp.camera.evaluated_get(dg), frame, config)
                cached = cache / f"{key}{spec.suffix}"
                if cached.is_file():
                    os.utime(cached)  # marks it used for prune_cache
                else:
                    ext = ".png" if kind == "flat" else ".exr"
                    rendered = _render_still(tmp, scratch / f"frame{ext}")
                    spec.store(rendered, cached, layer)
                out.append(cached)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return out
