"""Bone-name presets of the OpenPose pass (blender_t2vz/scene_control/openpose/presets.py)."""

import pytest

from blender_t2vz import scene_control as sc

from .rig_scene import FRAMES, RIG_NAMES, H, W, add_armature, by_hand, mixamo_skeleton, world_point


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


# ------------------------------------------------------------------ real Mixamo rigs

# Mixamo's FBX namespace as it reaches Blender: none (a tool dropped it), Mixamo's own, a
# second import, a character's own name.
PREFIXES = ("", "mixamorig:", "mixamorig1:", "MyChar:")


@pytest.fixture(scope="module")
def mixamo_rigs(scene3d):
    """Full Mixamo skeletons, one per prefix, side by side behind the other characters."""
    return {
        prefix: add_armature(
            scene3d,
            f"Mixamo {prefix or 'bare'}",
            mixamo_skeleton(prefix),
            (-1.8 + 1.2 * i, 3.0, 0.0),
        )
        for i, prefix in enumerate(PREFIXES)
    }


def test_auto_finds_mixamo_bones_with_any_prefix_or_none(mixamo_rigs):
    for prefix, rig in mixamo_rigs.items():
        bones = rig.data.bones.keys()
        assert len(bones) == 67 and prefix + "LeftHandPinky4" in bones
        assert sc.mixamo_prefix(bones) == prefix
        assert sc.detect_preset(bones) == "mixamo", prefix
        for preset in ("auto", "mixamo"):
            mapping = sc.resolve_bone_map(bones, preset)
            assert mapping["l_wrist"] == (prefix + "LeftHand", 0.0)
            assert mapping["r_knee"] == (prefix + "RightLeg", 0.0)
            assert mapping["nose"] == (prefix + "Head", 0.4)
            assert mapping["r_eye"] == (prefix + "RightEye", 0.0)
            assert set(sc.KEYPOINT_NAMES) - set(mapping) == {"r_ear", "l_ear"}


def test_mixamo_rigs_pose_where_their_bones_are(scene3d, mixamo_rigs):
    for prefix, rig in mixamo_rigs.items():
        for preset in ("auto", "mixamo"):
            frames = sc.keypoint_frames(scene3d, FRAMES, W, H, [sc.Character(rig.name, preset)])
            assert all(len(people) == 1 for people in frames), (prefix, preset)
            person = frames[0][0]
            for joint, bone in (
                ("neck", "Neck"),
                ("l_wrist", "LeftHand"),
                ("r_ankle", "RightFoot"),
            ):
                expected = by_hand(scene3d, 1, world_point(scene3d, 1, rig.name, prefix + bone))
                key = sc.KEYPOINT_NAMES.index(joint)
                assert person[key] == pytest.approx(expected, abs=1e-4), (prefix, preset, joint)
    scene3d.frame_set(1)


def test_a_preset_that_matches_no_bone_is_an_error(scene3d, mixamo_rigs, tmp_path):
    bare = mixamo_rigs[""].name
    # Rigify's names on a Mixamo rig: the error names the armature and what was looked for.
    with pytest.raises(sc.SceneControlError) as error:
        sc.keypoint_frames(scene3d, [1], W, H, [sc.Character(bare, "rigify")])
    message = str(error.value)
    assert f"armature {bare!r}: bone preset 'rigify' matches no bone" in message
    assert "DEF-upper_arm.R" in message and "its bones are" in message
    # Mixamo's names on the meta-rig, through a job's controls: no pose file is written.
    folder = tmp_path / "scene"
    control = sc.SceneControl("openpose", "m", 1.0, [sc.Character("Rig metarig", "mixamo")])
    with pytest.raises(sc.SceneControlError, match="'Rig metarig': bone preset 'mixamo'") as error:
        sc.build_scene_controls(scene3d, folder, [control], FRAMES, W, H)
    assert "RightArm" in str(error.value) and "any prefix" in str(error.value)
    assert not (folder / "pose.json").exists()
    # Custom without overrides maps nothing either.
    with pytest.raises(sc.SceneControlError, match="no keypoint maps to a bone"):
        sc.keypoint_frames(scene3d, [1], W, H, [sc.Character(bare, "custom")])
    # Rigify and the meta-rig keep working with their presets.
    for preset in ("rigify", "metarig"):
        people = sc.keypoint_frames(scene3d, [1], W, H, [sc.Character(f"Rig {preset}", preset)])
        assert sum(k is not None for k in people[0][0]) >= 13
