"""Bone-name presets: which bone point of an armature each OpenPose keypoint sits on.

Presets name the bones of Rigify (DEF-/ORG-), Mixamo (any ``namespace:`` prefix) and
Blender's human meta-rig; per-keypoint overrides map any other rig.
"""

from __future__ import annotations

from collections import Counter
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

# Mixamo: names after a prefix found per armature ("mixamorig:", "mixamorig1:", "MyChar:",
# none at all when a tool dropped the namespace).
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
# The Mixamo bone names the preset uses, without a prefix.
_MIXAMO_BONES = tuple(dict.fromkeys(b for points in _MIXAMO.values() for b, _ in points))
PRESET_ITEMS = ("auto", "rigify", "mixamo", "metarig", "custom")
# An armature must resolve at least this many keypoints for "auto" to accept a preset.
MIN_AUTO_KEYPOINTS = 4


def mixamo_prefix(bone_names: Iterable[str]) -> str:
    """The prefix of an armature's Mixamo bones: "mixamorig:", "mixamorig1:", "MyChar:", "".

    Mixamo names its bones ``<namespace>:Hips`` ..., and other tools drop or rename the
    namespace, so the prefix is the one most of the bones share before a Mixamo name.
    """
    counts: Counter[str] = Counter()
    for name in bone_names:
        for base in _MIXAMO_BONES:
            if name.endswith(base):
                counts[name[: -len(base)]] += 1
    if not counts:
        return "mixamorig:"
    # Most bones first; on a tie the shorter prefix (and then the name) decides.
    return min(counts, key=lambda prefix: (-counts[prefix], len(prefix), prefix))


def _looked_for(preset: str, bone_names: set[str], limit: int = 12) -> str:
    """The bone names a preset looks for, for an error message."""
    points = _MIXAMO if preset == "mixamo" else _preset_points(preset, bone_names)
    names = list(dict.fromkeys(b for candidates in points.values() for b, _ in candidates))
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    if preset == "mixamo":
        return f"{shown}, with any prefix such as 'mixamorig:' or none"
    return shown


def _some_bones(bone_names: set[str], limit: int = 6) -> str:
    """A few of an armature's bone names, for an error message."""
    names = sorted(bone_names)
    if not names:
        return "it has no bones"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"its bones are {', '.join(names[:limit])}{more}"


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
    if preset != "custom" and not mapping:
        # A wrong preset would draw no person on any frame: say so instead.
        raise SceneControlError(
            f"bone preset {preset!r} matches no bone: it looks for "
            f"{_looked_for(preset, names)}; {_some_bones(names)}. "
            "Choose another preset (or Auto) or give per-keypoint overrides"
        )
    for key, text in (overrides or {}).items():
        point = parse_override(key, text, names)
        if point is None:
            mapping.pop(key, None)
        else:
            mapping[key] = point
    if not mapping:
        raise SceneControlError("no keypoint maps to a bone; give per-keypoint overrides")
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
        f"bone names match no preset (rigify, mixamo, metarig; {_some_bones(names)}); "
        "choose a preset or give per-keypoint overrides"
    )
