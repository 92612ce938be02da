"""Bone-name presets: which bone point of an armature each OpenPose keypoint sits on.

Presets name the bones of Rigify (DEF-/ORG-), Mixamo (any ``namespace:`` prefix) and
Blender's human meta-rig; per-keypoint overrides map any other rig.
"""

from __future__ import annotations

from collections.abc import Iterable

from ... import backend_paths
from ..errors import SceneControlError

# The keypoint names live in the backend's protocol module (stdlib only).
KEYPOINT_NAMES = backend_paths.load_protocol().KEYPOINT_NAMES


# A bone point: (bone name, position along the bone: 0 head .. 1 tail).
BonePoint = tuple[str, float]

# Blender's human meta-rig (Rigify's): keypoint -> candidate bone points, first found wins.
_METARIG: dict[str, tuple[BonePoint, ...]] = {
    "nose": (("nose.002", 0.0), ("nose", 1.0), ("spine.006", 0.4)),
    "neck": (("spine.004", 0.0),),
    "r_shoulder": (("upper_arm.R", 0.0),),
    "r_elbow": (("forearm.R", 0.0),),
    "r_wrist": (("hand.R", 0.0),),
    "l_shoulder": (("upper_arm.L", 0.0),),
    "l_elbow": (("forearm.L", 0.0),),
    "l_wrist": (("hand.L", 0.0),),
    "r_hip": (("thigh.R", 0.0),),
    "r_knee": (("shin.R", 0.0),),
    "r_ankle": (("foot.R", 0.0),),
    "l_hip": (("thigh.L", 0.0),),
    "l_knee": (("shin.L", 0.0),),
    "l_ankle": (("foot.L", 0.0),),
    "r_eye": (("eye.R", 0.0),),
    "l_eye": (("eye.L", 0.0),),
    "r_ear": (("ear.R", 0.0),),
    "l_ear": (("ear.L", 0.0),),
}

# A generated Rigify rig: the deform bones, else the ORG- copies of the meta-rig's bones.
_RIGIFY: dict[str, tuple[BonePoint, ...]] = {
    key: tuple((f"{prefix}-{bone}", t) for bone, t in points for prefix in ("DEF", "ORG"))
    for key, points in _METARIG.items()
}

# Mixamo: names after the "mixamorig:" prefix (or "mixamorig1:", ...), found per armature.
_MIXAMO: dict[str, tuple[BonePoint, ...]] = {
    "nose": (("Head", 0.4),),
    "neck": (("Neck", 0.0),),
    "r_shoulder": (("RightArm", 0.0),),
    "r_elbow": (("RightForeArm", 0.0),),
    "r_wrist": (("RightHand", 0.0),),
    "l_shoulder": (("LeftArm", 0.0),),
    "l_elbow": (("LeftForeArm", 0.0),),
    "l_wrist": (("LeftHand", 0.0),),
    "r_hip": (("RightUpLeg", 0.0),),
    "r_knee": (("RightLeg", 0.0),),
    "r_ankle": (("RightFoot", 0.0),),
    "l_hip": (("LeftUpLeg", 0.0),),
    "l_knee": (("LeftLeg", 0.0),),
    "l_ankle": (("LeftFoot", 0.0),),
    "r_eye": (("RightEye", 0.0),),
    "l_eye": (("LeftEye", 0.0),),
    "r_ear": (),
    "l_ear": (),
}

PRESETS: dict[str, dict[str, tuple[BonePoint, ...]]] = {
    "rigify": _RIGIFY,
    "mixamo": _MIXAMO,
    "metarig": _METARIG,
}
PRESET_ITEMS = ("auto", "rigify", "mixamo", "metarig", "custom")
# An armature must resolve at least this many keypoints for "auto" to accept a preset.
MIN_AUTO_KEYPOINTS = 4


def mixamo_prefix(bone_names: Iterable[str]) -> str:
    """The "mixamorig:"-style prefix of an armature's bones, found from its Hips bone."""
    for name in bone_names:
        if name.endswith("Hips") and ":" in name:
            return name[: -len("Hips")]
    return "mixamorig:"


def _preset_points(preset: str, bone_names: set[str]) -> dict[str, tuple[BonePoint, ...]]:
    """A preset's candidates, with Mixamo's prefix applied for these bone names."""
    if preset == "custom":
        return {key: () for key in KEYPOINT_NAMES}
    if preset not in PRESETS:
        raise SceneControlError(f"unknown bone preset {preset!r}; use one of {PRESET_ITEMS}")
    points = PRESETS[preset]
    if preset == "mixamo":
        prefix = mixamo_prefix(bone_names)
        points = {k: tuple((prefix + b, t) for b, t in v) for k, v in points.items()}
    return points


def parse_override(keypoint: str, text: str, bone_names: set[str]) -> BonePoint | None:
    """A per-keypoint override "Bone[:head|:tail|:0..1]" as a bone point; "" leaves it out."""
    if keypoint not in KEYPOINT_NAMES:
        raise SceneControlError(
            f"override for unknown keypoint {keypoint!r}; keypoints: {', '.join(KEYPOINT_NAMES)}"
        )
    text = text.strip()
    if not text:
        return None
    bone, where = text, ""
    head, sep, tail = text.rpartition(":")
    if sep and head in bone_names and text not in bone_names:
        bone, where = head, tail.strip().lower()
    if bone not in bone_names:
        raise SceneControlError(f"override {keypoint}={text!r}: no bone named {bone!r}")
    if where in ("", "head"):
        return bone, 0.0
    if where == "tail":
        return bone, 1.0
    try:
        t = float(where)
    except ValueError:
        raise SceneControlError(
            f"override {keypoint}={text!r}: expected head, tail or 0..1 after ':', got {where!r}"
        ) from None
    if not 0.0 <= t <= 1.0:
        raise SceneControlError(f"override {keypoint}={text!r}: position must be 0..1, got {t}")
    return bone, t


def resolve_bone_map(
    bone_names: Iterable[str], preset: str = "auto", overrides: dict[str, str] | None = None
) -> dict[str, BonePoint]:
    """Keypoint name -> bone point for an armature's bones, from a preset and overrides."""
    names = set(bone_names)
    if preset == "auto":
        preset = detect_preset(names, overrides)
    mapping: dict[str, BonePoint] = {}
    for key, candidates in _preset_points(preset, names).items():
        found = next((c for c in candidates if c[0] in names), None)
        if found is not None:
            mapping[key] = found
    for key, text in (overrides or {}).items():
        point = parse_override(key, text, names)
        if point is None:
            mapping.pop(key, None)
        else:
            mapping[key] = point
    return mapping


def detect_preset(bone_names: Iterable[str], overrides: dict[str, str] | None = None) -> str:
    """The preset that resolves most keypoints for these bones ("custom" if only overrides)."""
    names = set(bone_names)
    scores = {
        p: sum(any(b in names for b, _ in c) for c in _preset_points(p, names).values())
        for p in PRESETS
    }
    best = max(scores, key=lambda p: scores[p])
    if scores[best] >= MIN_AUTO_KEYPOINTS:
        return best
    if overrides:
        return "custom"
    raise SceneControlError(
        "bone names match no preset (rigify, mixamo, metarig); "
        "choose a preset or give per-keypoint overrides"
    )
