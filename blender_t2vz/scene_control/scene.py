"""Temporary scenes and renders: the user's scene and render settings are never touched."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import bpy

from .errors import SceneControlError


def _check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 16384:
            raise SceneControlError(f"{name} must be a whole number of pixels, got {value!r}")


def _camera(scene, camera):
    camera = camera or scene.camera
    if camera is None:
        raise SceneControlError(f"scene {scene.name!r} has no camera; set the scene camera")
    if isinstance(camera, str):
        name, camera = camera, bpy.data.objects.get(camera)
        if camera is None:
            raise SceneControlError(f"no camera object named {name!r}")
    if camera.type != "CAMERA":
        raise SceneControlError(f"object {camera.name!r} is a {camera.type}, not a CAMERA")
    return camera


@contextmanager
def temporary_scene(scene, width: int, height: int, camera=None, objects=None) -> Iterator:
    """A throwaway scene at width x height with the user's objects (or only ``objects``).

    Without ``objects`` it is a linked copy of ``scene`` (same collections, view layers and
    world); with them, a new scene holding just those objects and the camera. The user's
    scene is never modified, and the temporary one is removed on exit.
    """
    _check_size(width, height)
    camera = _camera(scene, camera)
    linestyles = set(bpy.data.linestyles)
    if objects is None:
        tmp = scene.copy()
    else:
        tmp = bpy.data.scenes.new("_t2vz_scene_control")
        tmp.cycles.device = scene.cycles.device
        for obj in {camera, *objects}:
            if tmp.collection.objects.get(obj.name) is None:
                tmp.collection.objects.link(obj)
        tmp.frame_start, tmp.frame_end = scene.frame_start, scene.frame_end
        tmp.render.fps, tmp.render.fps_base = scene.render.fps, scene.render.fps_base
    try:
        tmp.name = "_t2vz_scene_control"
        tmp.camera = camera
        render = tmp.render
        render.resolution_x, render.resolution_y = width, height
        render.resolution_percentage = 100
        render.pixel_aspect_x = render.pixel_aspect_y = 1.0
        render.use_border = False
        render.use_multiview = False
        render.use_motion_blur = False
        render.use_compositing = False
        render.use_sequencer = False
        render.use_stamp = False
        yield tmp
    finally:
        bpy.data.scenes.remove(tmp, do_unlink=True)
        # Renders of the copy leave its frame's animated values in the shared objects: put
        # them back as the user's scene has them at its own frame.
        scene.frame_set(scene.frame_current, subframe=scene.frame_subframe)
        for style in set(bpy.data.linestyles) - linestyles:
            if style.users == 0:
                bpy.data.linestyles.remove(style)


def _set_frame(tmp, frame: int):
    """Evaluate the temporary scene at a frame; its view-layer depsgraph."""
    if isinstance(frame, bool) or not isinstance(frame, int):
        raise SceneControlError(f"frame must be a whole number, got {frame!r}")
    tmp.frame_set(frame)
    return tmp.view_layers[0].depsgraph


def _render_layer(tmp) -> str:
    """The view layer to render: the first one enabled for rendering."""
    layer = next((v for v in tmp.view_layers if v.use), tmp.view_layers[0])
    return layer.name


def _use_cycles(tmp, samples: int = 1) -> None:
    """One-sample Cycles without denoising or bounces: passes, not pictures."""
    tmp.render.engine = "CYCLES"
    cycles = tmp.cycles
    cycles.samples = samples
    cycles.use_denoising = False
    cycles.use_adaptive_sampling = False
    cycles.max_bounces = 0
    cycles.seed = 0
    cycles.use_animated_seed = False
    tmp.render.film_transparent = True


def _use_multilayer_exr(tmp) -> None:
    """Write renders as uncompressed 32-bit multilayer OpenEXR (all passes in one file)."""
    settings = tmp.render.image_settings
    if hasattr(settings, "media_type"):  # Blender 5.0+
        settings.media_type = "MULTI_LAYER_IMAGE"
    settings.file_format = "OPEN_EXR_MULTILAYER"
    settings.exr_codec = "NONE"
    settings.color_depth = "32"


def _render_still(tmp, path: Path) -> Path:
    """Render the temporary scene's current frame to ``path``; the written file."""
    tmp.render.filepath = str(path)
    tmp.render.use_file_extension = False
    # Given another scene than the context's, the render operator renders it at the
    # context scene's frame: make the temporary scene the context scene.
    with bpy.context.temp_override(scene=tmp):
        bpy.ops.render.render(write_still=True, scene=tmp.name, layer=_render_layer(tmp))
    if not path.is_file():
        raise SceneControlError(f"Blender did not write the render {path}")
    return path
