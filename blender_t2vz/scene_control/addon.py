"""Add-on hooks: the panel's "3D Scene" ControlNet settings and the job planner's hooks."""

from __future__ import annotations

import os
import time
from pathlib import Path

import bpy
from bpy.props import EnumProperty, PointerProperty, StringProperty

from .cache import cache_dir, prune_cache
from .controls import render_scene_control
from .errors import SceneControlError
from .files import _abs
from .masks import render_mask_frames
from .openpose import Character
from .vectors import render_flow_frames

# Shared pass cache beside the jobs' staging folders; entries unused this long are removed.
CACHE_FOLDER = "scene_cache"
CACHE_MAX_AGE_S = 3 * 24 * 3600
_PASS_KINDS = {"DEPTH": "depth", "OPENPOSE": "openpose", "CANNY": "canny"}


def parse_overrides(text: str) -> dict[str, str]:
    """'nose=Head:0.4; l_ear=EarL' -> {"nose": "Head:0.4", "l_ear": "EarL"}."""
    out: dict[str, str] = {}
    for part in text.replace("\n", ";").split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise SceneControlError(f"bone override {part.strip()!r}: expected keypoint=Bone")
        out[key.strip()] = value.strip()
    return out


def _poll_camera(_self, obj) -> bool:
    return obj.type == "CAMERA"


class T2VZ_SceneControlSettings(bpy.types.PropertyGroup):
    """How a ControlNet entry with source "3D Scene" renders its passes."""

    scene: PointerProperty(
        name="Scene", type=bpy.types.Scene, description="Scene to render; empty: this scene"
    )
    camera: PointerProperty(
        name="Camera",
        type=bpy.types.Object,
        poll=_poll_camera,
        description="Camera to render from; empty: the scene camera",
    )
    edges: EnumProperty(
        name="Edges",
        items=[
            ("CANNY", "Canny of Flat Shading", "Workbench flat pass; the backend runs canny"),
            ("FREESTYLE", "Freestyle Lines", "Freestyle lines of the scene, white on black"),
        ],
        default="CANNY",
    )
    characters: PointerProperty(
        name="Characters",
        type=bpy.types.Collection,
        description="Collection with the armatures to pose; empty: every armature in the scene",
    )
    preset: EnumProperty(
        name="Bone Names",
        items=[
            ("auto", "Auto", "Pick the preset that matches each armature's bones"),
            ("rigify", "Rigify", "A generated Rigify rig (DEF-/ORG- bones)"),
            (
                "mixamo",
                "Mixamo",
                "Mixamo bones (Hips, LeftArm, ...) with any prefix (mixamorig:, MyChar:) or none",
            ),
            ("metarig", "Human Meta-Rig", "Blender's human meta-rig"),
            ("custom", "Custom", "Only the bone overrides"),
        ],
        default="auto",
    )
    overrides: StringProperty(
        name="Bone Overrides",
        description="Per keypoint: keypoint=Bone[:head|:tail|:0..1], separated by ';' "
        "(e.g. 'nose=Head:0.4; l_ear=EarL'; 'r_ear=' leaves a keypoint out)",
    )
    foreground: PointerProperty(
        name="Foreground",
        type=bpy.types.Collection,
        description="Objects masked as foreground for background smoothing; empty: all geometry",
    )


def _settings(item):
    return getattr(item, "scene_control", None)


def _source_scene(context, item):
    settings = _settings(item)
    return settings.scene if settings is not None and settings.scene else context.scene


def scene_frames(context, item, start: int, frames: int) -> list[int]:
    """Scene frames for a job starting at timeline frame ``start`` (other scenes: their start)."""
    scene = _source_scene(context, item)
    first = start if scene == context.scene else scene.frame_start
    return list(range(first, first + frames))


def item_kind(item) -> str:
    """The scene pass of a ControlNet entry: depth, openpose, canny or lines."""
    kind = _PASS_KINDS.get(item.scene_pass)
    if kind is None:
        raise SceneControlError(f"unknown scene pass {item.scene_pass!r}")
    settings = _settings(item)
    if kind == "canny" and settings is not None and settings.edges == "FREESTYLE":
        return "lines"
    return kind


def item_characters(context, item) -> list[Character] | None:
    """The characters of an entry: armatures of its collection (or None: the scene's)."""
    settings = _settings(item)
    if settings is None:
        return None
    overrides = parse_overrides(settings.overrides)
    if settings.characters is not None:
        objects = [o for o in settings.characters.all_objects if o.type == "ARMATURE"]
        if not objects:
            raise SceneControlError(f"collection {settings.characters.name!r} has no armature")
    else:
        objects = [o for o in _source_scene(context, item).objects if o.type == "ARMATURE"]
        objects = [o for o in objects if not o.hide_render]
    return [Character(o.name, settings.preset, overrides) for o in objects] or None


def _shared_cache(folder: str | os.PathLike) -> Path:
    """The pass cache shared by jobs, beside the job's staging folder (created: a pass that
    renders nothing through it, like OpenPose, still prunes it)."""
    return cache_dir(folder, _abs(folder).parent.parent / CACHE_FOLDER)


def render_control(context, item, start: int, frames: int, width: int, height: int, folder) -> dict:
    """Add-on hook: render an entry's scene pass into folder; the job's control VideoInput."""
    scene = _source_scene(context, item)
    settings = _settings(item)
    camera = settings.camera if settings is not None else None
    kind = item_kind(item)
    characters = item_characters(context, item) if kind == "openpose" else None
    cache = _shared_cache(folder)
    path, _detector = render_scene_control(
        scene,
        folder,
        kind,
        scene_frames(context, item, start, frames),
        width,
        height,
        camera,
        characters,
        cache,
    )
    prune_cache(cache, time.time() - CACHE_MAX_AGE_S)
    return {"path": str(path), "start": 0, "stride": 1.0}


def render_masks(context, item, start: int, frames: int, width: int, height: int, folder) -> dict:
    """Add-on hook: foreground masks for background smoothing; the job's masks VideoInput."""
    settings = _settings(item)
    foreground = None
    if settings is not None and settings.foreground is not None:
        foreground = list(settings.foreground.all_objects)
    paths = render_mask_frames(
        _source_scene(context, item),
        folder,
        scene_frames(context, item, start, frames),
        width,
        height,
        foreground,
        settings.camera if settings is not None else None,
        cache=_shared_cache(folder),
    )
    return {"path": str(paths[0].parent), "start": 0, "stride": 1.0}


def render_flow(context, item, start: int, frames: int, width: int, height: int, folder) -> str:
    """Add-on hook: the scene's motion vectors (the Vector pass, exact) for a job with
    consistency "flow"; the folder of .npy frames its ``flow_source`` names. Rendered with the
    Z pass into the shared cache, so the job's depth and masks reuse the same renders."""
    settings = _settings(item)
    path = render_flow_frames(
        _source_scene(context, item),
        folder,
        scene_frames(context, item, start, frames),
        width,
        height,
        settings.camera if settings is not None else None,
        cache=_shared_cache(folder),
    )
    return str(path)


def draw_control_settings(layout, context, item) -> None:
    """Add-on hook: the entry's scene settings in the ControlNet panel."""
    settings = _settings(item)
    if settings is None:
        return
    layout.prop(settings, "scene")
    layout.prop(settings, "camera")
    if item.scene_pass == "OPENPOSE":
        layout.prop(settings, "characters")
        layout.prop(settings, "preset")
        layout.prop(settings, "overrides")
    elif item.scene_pass == "CANNY":
        layout.prop(settings, "edges")
    layout.prop(settings, "foreground")


def _item_class():
    from .. import properties

    return properties.T2VZ_ControlNetItem


def register() -> None:
    """Register the settings and attach them to the add-on's ControlNet entries."""
    bpy.utils.register_class(T2VZ_SceneControlSettings)
    _item_class().scene_control = PointerProperty(type=T2VZ_SceneControlSettings)


def unregister() -> None:
    """Detach and unregister the settings."""
    item = _item_class()
    if hasattr(item, "scene_control"):
        del item.scene_control
    bpy.utils.unregister_class(T2VZ_SceneControlSettings)
