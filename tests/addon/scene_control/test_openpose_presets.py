"""Bone-name presets of the OpenPose pass (blender_t2vz/scene_control/openpose/presets.py)."""

import pytest
from rig_scene import RIG_NAMES

from blender_t2vz import scene_control as sc


def test_presets_resolve_each_rig_naming():
    for preset, names in RIG_NAMES.items():
        bones = set(names.values())
        assert sc.detect_preset(bones) == preset
        mapping = sc.resolve_bone_map(bones)
        assert mapping["r_shoulder"] == (names["r_shoulder"], 0.0)
        assert mapping["l_ankle"] == (names["l_ankle"], 0.0)
        assert mapping["neck"] == (names["neck"], 0.0)
        assert "r_ear" not in mapping
    # Mixamo characters imported twice get "mixamorig1:" names; Rigify falls back to ORG-.
    second = {n.replace("mixamorig:", "mixamorig1:") for n in RIG_NAMES["mixamo"].values()}
    assert sc.resolve_bone_map(second)["l_wrist"] == ("mixamorig1:LeftHand", 0.0)
    org = {n.replace("DEF-", "ORG-") for n in RIG_NAMES["rigify"].values()}
    assert sc.resolve_bone_map(org, "rigify")["r_knee"] == ("ORG-shin.R", 0.0)


def test_overrides_map_any_rig():
    bones = {"Pelvis", "Torso", "ArmR", "mixamorig:Head"}
    mapping = sc.resolve_bone_map(
        bones, "auto", {"r_shoulder": "ArmR", "neck": "Torso:tail", "nose": "mixamorig:Head:0.25"}
    )
    assert mapping == {
        "r_shoulder": ("ArmR", 0.0),
        "neck": ("Torso", 1.0),
        "nose": ("mixamorig:Head", 0.25),
    }
    # "" leaves a preset's keypoint out.
    meta = set(RIG_NAMES["metarig"].values())
    assert "neck" not in sc.resolve_bone_map(meta, "metarig", {"neck": ""})
    with pytest.raises(sc.SceneControlError, match="no bone named 'Nope'"):
        sc.resolve_bone_map(bones, "custom", {"neck": "Nope"})
    with pytest.raises(sc.SceneControlError, match="unknown keypoint 'chin'"):
        sc.resolve_bone_map(bones, "custom", {"chin": "ArmR"})
    with pytest.raises(sc.SceneControlError, match="'middle'"):
        sc.resolve_bone_map(bones, "custom", {"neck": "ArmR:middle"})
    with pytest.raises(sc.SceneControlError, match="match no preset"):
        sc.resolve_bone_map(bones)
    with pytest.raises(sc.SceneControlError, match="unknown bone preset 'maya'"):
        sc.resolve_bone_map(bones, "maya")
