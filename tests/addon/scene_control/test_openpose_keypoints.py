"""Keypoints projected from armatures (blender_t2vz/scene_control/openpose/keypoints.py)."""

import json

import pytest

from blender_t2vz import scene_control as sc

from .rig_scene import FRAMES, RIG_NAMES, H, W, by_hand, world_point


def test_keypoints_land_where_the_bones_are(scene3d):
    order = ("rigify", "mixamo", "metarig")
    characters = [sc.Character(f"Rig {preset}") for preset in order]
    frames = sc.keypoint_frames(scene3d, FRAMES, W, H, characters)
    assert len(frames) == 3 and all(len(people) == 3 for people in frames)
    for frame_index, frame in enumerate(FRAMES):
        for person, preset in zip(frames[frame_index], order, strict=True):
            names = RIG_NAMES[preset]
            for joint in ("neck", "r_shoulder", "l_wrist", "r_knee", "l_ankle"):
                key = sc.KEYPOINT_NAMES.index(joint)
                world = world_point(scene3d, frame, f"Rig {preset}", names[joint])
                expected = by_hand(scene3d, frame, world)
                assert person[key] == pytest.approx(expected, abs=1e-4), (preset, frame, joint)
            # Nose from the head bone (meta-rig and Rigify fallback, Mixamo at 0.4).
            assert person[0] is not None
    # The character on the left of the frame is the Rigify one: people keep armature order.
    assert frames[0][0][1][0] < frames[0][1][1][0] < frames[0][2][1][0]
    # OpenPose right is the character's right: facing the camera it is on the image left.
    r_sho, l_sho = frames[0][1][2], frames[0][1][5]
    assert r_sho[0] < l_sho[0]
    # y runs down: the neck is above the knees.
    assert frames[0][1][1][1] < frames[0][1][9][1]
    scene3d.frame_set(1)


def test_a_bone_moving_right_moves_its_keypoint_right(scene3d):
    frames = sc.keypoint_frames(scene3d, FRAMES, W, H, [sc.Character("Rig metarig")])
    wrist = [f[0][sc.KEYPOINT_NAMES.index("l_wrist")] for f in frames]
    elbow = [f[0][sc.KEYPOINT_NAMES.index("l_elbow")] for f in frames]
    assert wrist[0][0] < wrist[1][0] < wrist[2][0]
    assert wrist[2][1] == pytest.approx(wrist[0][1], abs=1e-3)
    assert elbow[0] == elbow[2]  # only the hand moves
    walker = sc.keypoint_frames(scene3d, [1, 3], W, H, [sc.Character("Rig rigify", "rigify")])
    assert walker[1][0][1][0] > walker[0][0][1][0]
    assert scene3d.frame_current == 1
    assert scene3d.objects["Rig rigify"].location.x == pytest.approx(-1.2)


def test_keypoints_off_screen_or_behind_the_camera_are_left_out(scene3d):
    rig = scene3d.objects["Rig mixamo"]
    saved = rig.location.copy()
    try:
        # Half out of the frame on the right: the right-hand side keypoints (the character's
        # left) fall outside, the others stay.
        rig.location = (3.0, 0.0, 0.0)
        person = sc.keypoint_frames(scene3d, [1], W, H, [sc.Character(rig.name)])[0][0]
        assert person[sc.KEYPOINT_NAMES.index("l_shoulder")] is None
        assert person[sc.KEYPOINT_NAMES.index("r_shoulder")] is not None
        # Behind the camera, right on its axis (a naive projection would mirror it in frame).
        rig.location = (0.0, -12.0, 0.0)
        assert sc.keypoint_frames(scene3d, [1], W, H, [sc.Character(rig.name)]) == [[]]
        # Far off to the side: the person is dropped entirely.
        rig.location = (40.0, 0.0, 0.0)
        assert sc.keypoint_frames(scene3d, [1], W, H, [sc.Character(rig.name)]) == [[]]
    finally:
        rig.location = saved


def test_openpose_json_draws_the_expected_limb_colours(scene3d, tmp_path):
    pytest.importorskip("cv2")  # the backend draws poses with OpenCV
    from backend.media.pose import COLORS, LIMB_ALPHA, LIMBS, load_pose_file, render_pose_frames

    width, height = 256, 192
    frames = sc.keypoint_frames(scene3d, [1], width, height, [sc.Character("Rig metarig")])
    path = sc.write_pose_json(tmp_path / "pose.json", frames)
    assert json.loads(path.read_text())["format"] == "openpose18"
    assert len(load_pose_file(path)) == 1
    image = render_pose_frames(path, width, height)[0]
    person = frames[0][0]
    for a, b in ((1, 2), (1, 5), (8, 9), (11, 12)):
        (xa, ya), (xb, yb) = person[a], person[b]
        x, y = (xa + xb) / 2 * width, (ya + yb) / 2 * height
        expected = [int(LIMB_ALPHA * c) for c in COLORS[LIMBS.index((a, b))]]
        assert image[int(round(y)), int(round(x))].tolist() == pytest.approx(expected, abs=2)
    # Far from every limb: black.
    assert not image[5, 5].any()
