"""The OpenPose pass: bone presets (``presets``) and projected keypoints (``keypoints``)."""

from .draw import draw_pose, pose_preview
from .keypoints import (
    POSE_FORMAT,
    Character,
    bone_point_world,
    keypoint_frames,
    person_keypoints,
    project_point,
    scene_characters,
    write_pose_json,
)
from .presets import (
    KEYPOINT_NAMES,
    MIN_AUTO_KEYPOINTS,
    PRESET_ITEMS,
    PRESETS,
    BonePoint,
    detect_preset,
    mixamo_prefix,
    parse_override,
    resolve_bone_map,
)

__all__ = [
    "KEYPOINT_NAMES",
    "MIN_AUTO_KEYPOINTS",
    "POSE_FORMAT",
    "PRESETS",
    "PRESET_ITEMS",
    "BonePoint",
    "Character",
    "bone_point_world",
    "detect_preset",
    "draw_pose",
    "keypoint_frames",
    "mixamo_prefix",
    "parse_override",
    "person_keypoints",
    "pose_preview",
    "project_point",
    "resolve_bone_map",
    "scene_characters",
    "write_pose_json",
]
