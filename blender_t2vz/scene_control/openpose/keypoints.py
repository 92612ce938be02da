"""Armature bones projected through the camera into OpenPose COCO-18 keypoint files."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import bpy
from bpy_extras.object_utils import world_to_camera_view

from ... import backend_paths
from ..errors import SceneControlError
from ..files import _atomic_write_bytes
from ..scene import _set_frame, temporary_scene
from .presets import KEYPOINT_NAMES, BonePoint, resolve_bone_map

# The keypoint file contract lives in the backend's protocol module (stdlib only).
POSE_FORMAT = backend_paths.load_protocol().POSE_FORMAT


@dataclass
class Character:
    """One armature to draw as an OpenPose person."""

    armature: str
    # "auto", one of PRESETS, or "custom" (overrides only).
    preset: str = "auto"
    # keypoint name -> "Bone", "Bone:head", "Bone:tail", "Bone:0.4", or "" to leave it out.
    overrides: dict[str, str] = field(default_factory=dict)


def project_point(scene, camera, co) -> tuple[float, float] | None:
    """World point -> (x, y) in 0..1 of the frame (y down), or None if behind or outside."""
    v = world_to_camera_view(scene, camera, co)
    if v.z <= 0.0 or not (0.0 <= v.x <= 1.0 and 0.0 <= v.y <= 1.0):
        return None
    return float(v.x), float(1.0 - v.y)


def bone_point_world(armature_eval, point: BonePoint):
    """World position of a bone point on an evaluated armature object."""
    bone = armature_eval.pose.bones[point[0]]
    local = bone.head.lerp(bone.tail, point[1])
    return armature_eval.matrix_world @ local


def person_keypoints(
    scene, camera, armature_eval, bone_map: dict[str, BonePoint]
) -> list[list[float] | None]:
    """The 18 OpenPose keypoints of one evaluated armature seen through the camera."""
    person: list[list[float] | None] = []
    for key in KEYPOINT_NAMES:
        point = bone_map.get(key)
        xy = (
            None
            if point is None
            else project_point(scene, camera, bone_point_world(armature_eval, point))
        )
        person.append(None if xy is None else [round(xy[0], 6), round(xy[1], 6)])
    return person


def _armature(scene, name: str):
    obj = scene.objects.get(name) or bpy.data.objects.get(name)
    if obj is None:
        raise SceneControlError(f"no armature object named {name!r} in scene {scene.name!r}")
    if obj.type != "ARMATURE":
        raise SceneControlError(f"object {name!r} is a {obj.type}, not an ARMATURE")
    return obj


def scene_characters(scene) -> list[Character]:
    """Every armature in the scene that renders, as a character with the "auto" preset."""
    return [Character(o.name) for o in scene.objects if o.type == "ARMATURE" and not o.hide_render]


def keypoint_frames(
    scene,
    frames: Sequence[int],
    width: int,
    height: int,
    characters: Sequence[Character] | None = None,
    camera=None,
) -> list[list[list[list[float] | None]]]:
    """Per frame, the OpenPose people of the characters (people with no keypoint dropped)."""
    characters = list(characters) if characters else scene_characters(scene)
    if not characters:
        raise SceneControlError(f"scene {scene.name!r} has no armature to take a pose from")
    maps = []
    for c in characters:
        obj = _armature(scene, c.armature)
        try:
            maps.append((obj, resolve_bone_map(obj.data.bones.keys(), c.preset, c.overrides)))
        except SceneControlError as exc:
            raise SceneControlError(f"armature {obj.name!r}: {exc}") from None
    out = []
    with temporary_scene(scene, width, height, camera) as tmp:
        for frame in frames:
            dg = _set_frame(tmp, frame)
            cam = tmp.camera.evaluated_get(dg)
            people = [person_keypoints(tmp, cam, o.evaluated_get(dg), m) for o, m in maps]
            out.append([p for p in people if any(k is not None for k in p)])
    return out


def write_pose_json(path: str | os.PathLike, frames: list) -> Path:
    """Write keypoint frames as an ``openpose18`` pose file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(path, json.dumps({"format": POSE_FORMAT, "frames": frames}).encode())
    return path
