"""Control passes rendered from a 3D scene (blender_t2vz/scene_control.py), in headless bpy.

The scene is built here in a scene of its own (camera, two cubes at different distances,
three armatures named like Rigify, Mixamo and the human meta-rig, animated) and removed
afterwards, so the other add-on tests sharing this bpy process see no trace of it.
Renders are Cycles at one sample on the CPU at 64-96 px.
"""

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="t2vz_bpy_user_"))
bpy = pytest.importorskip("bpy")
np = pytest.importorskip("numpy")
cv2 = pytest.importorskip("cv2")

from mathutils import Vector  # noqa: E402

from blender_t2vz import scene_control as sc  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
W, H = 96, 64
FRAMES = [1, 2, 3]

# One body in armature space (the character stands at the armature's origin, facing -Y,
# towards the camera): generic joint -> (head, tail).
BODY = {
    "hips": ((0.0, 0.0, 0.9), (0.0, 0.0, 1.05)),
    "neck": ((0.0, 0.0, 1.5), (0.0, 0.0, 1.65)),
    "head": ((0.0, 0.0, 1.65), (0.0, 0.0, 1.95)),
    "r_shoulder": ((-0.25, 0.0, 1.45), (-0.25, 0.0, 1.2)),
    "r_elbow": ((-0.25, 0.0, 1.2), (-0.25, 0.0, 0.95)),
    "r_wrist": ((-0.25, 0.0, 0.95), (-0.25, 0.0, 0.85)),
    "l_shoulder": ((0.25, 0.0, 1.45), (0.25, 0.0, 1.2)),
    "l_elbow": ((0.25, 0.0, 1.2), (0.25, 0.0, 0.95)),
    "l_wrist": ((0.25, 0.0, 0.95), (0.25, 0.0, 0.85)),
    "r_hip": ((-0.12, 0.0, 0.9), (-0.12, 0.0, 0.5)),
    "r_knee": ((-0.12, 0.0, 0.5), (-0.12, 0.0, 0.1)),
    "r_ankle": ((-0.12, 0.0, 0.1), (-0.12, -0.15, 0.0)),
    "l_hip": ((0.12, 0.0, 0.9), (0.12, 0.0, 0.5)),
    "l_knee": ((0.12, 0.0, 0.5), (0.12, 0.0, 0.1)),
    "l_ankle": ((0.12, 0.0, 0.1), (0.12, -0.15, 0.0)),
}
RIG_NAMES = {
    "metarig": {
        "hips": "spine",
        "neck": "spine.004",
        "head": "spine.006",
        "r_shoulder": "upper_arm.R",
        "r_elbow": "forearm.R",
        "r_wrist": "hand.R",
        "l_shoulder": "upper_arm.L",
        "l_elbow": "forearm.L",
        "l_wrist": "hand.L",
        "r_hip": "thigh.R",
        "r_knee": "shin.R",
        "r_ankle": "foot.R",
        "l_hip": "thigh.L",
        "l_knee": "shin.L",
        "l_ankle": "foot.L",
    },
    "mixamo": {
        "hips": "Hips",
        "neck": "Neck",
        "head": "Head",
        "r_shoulder": "RightArm",
        "r_elbow": "RightForeArm",
        "r_wrist": "RightHand",
        "l_shoulder": "LeftArm",
        "l_elbow": "LeftForeArm",
        "l_wrist": "LeftHand",
        "r_hip": "RightUpLeg",
        "r_knee": "RightLeg",
        "r_ankle": "RightFoot",
        "l_hip": "LeftUpLeg",
        "l_knee": "LeftLeg",
        "l_ankle": "LeftFoot",
    },
}
RIG_NAMES["rigify"] = {k: f"DEF-{v}" for k, v in RIG_NAMES["metarig"].items()}
RIG_NAMES["mixamo"] = {k: f"mixamorig:{v}" for k, v in RIG_NAMES["mixamo"].items()}
# Armature origins: three characters side by side, 8 units in front of the camera.
RIG_PLACES = {"rigify": (-1.2, 0.0, 0.0), "mixamo": (0.0, 0.0, 0.0), "metarig": (1.2, 0.0, 0.0)}
MOVING_BONE = "hand.L"  # on the meta-rig: moves +X (right) from frame 1 to 3


def _cube(scene, name, location, size=1.0):
    import bmesh

    mesh = bpy.data.meshes.new(name)
    bm = bmesh.new()
    bmesh.ops.create_cube(bm, size=size)
    bm.to_mesh(mesh)
    bm.free()
    obj = bpy.data.objects.new(name, mesh)
    obj.location = location
    scene.collection.objects.link(obj)
    return obj


def _armature(scene, name, bones, location):
    """An armature object with unparented bones, built through edit mode."""
    data = bpy.data.armatures.new(name)
    obj = bpy.data.objects.new(name, data)
    obj.location = location
    scene.collection.objects.link(obj)
    window = bpy.context.window
    previous = window.scene if window else None
    if window:
        window.scene = scene
    try:
        with bpy.context.temp_override(scene=scene, view_layer=scene.view_layers[0]):
            scene.view_layers[0].objects.active = obj
            bpy.ops.object.mode_set(mode="EDIT")
            for bone, (head, tail) in bones.items():
                edit = data.edit_bones.new(bone)
                edit.head, edit.tail = head, tail
            bpy.ops.object.mode_set(mode="OBJECT")
    finally:
        if window and previous is not None:
            window.scene = previous
    return obj


@pytest.fixture(scope="module")
def scene3d():
    """The test scene; removed with all its objects when the module is done."""
    before = {c: set(getattr(bpy.data, c)) for c in ("objects", "meshes", "armatures", "cameras")}
    scn = bpy.data.scenes.new("t2vz_scene_control_test")
    scn.frame_start, scn.frame_end = 1, 3
    scn.render.resolution_x, scn.render.resolution_y = 1920, 1080
    cam = bpy.data.objects.new("T2VZ Cam", bpy.data.cameras.new("T2VZ Cam"))
    scn.collection.objects.link(cam)
    scn.camera = cam
    cam.location = (0.0, -8.0, 1.0)
    cam.rotation_euler = (math.radians(90.0), 0.0, 0.0)
    _cube(scn, "Near", (-0.8, -4.0, 1.0))  # 4 units from the camera
    _cube(scn, "Far", (1.5, 6.0, 1.0))  # 14 units from the camera
    for preset, names in RIG_NAMES.items():
        bones = {names[joint]: ends for joint, ends in BODY.items()}
        _armature(scn, f"Rig {preset}", bones, RIG_PLACES[preset])
    # Animate one bone of the meta-rig in pose space so it moves +X in the world.
    rig = scn.objects["Rig metarig"]
    pose_bone = rig.pose.bones[MOVING_BONE]
    pose_bone.location = (0.0, 0.0, 0.0)
    pose_bone.keyframe_insert("location", frame=1)
    rest = rig.data.bones[MOVING_BONE].matrix_local.to_3x3()
    pose_bone.location = rest.inverted() @ Vector((0.6, 0.0, 0.0))
    pose_bone.keyframe_insert("location", frame=3)
    # And the Rigify character walks right as a whole.
    walker = scn.objects["Rig rigify"]
    walker.keyframe_insert("location", frame=1)
    walker.location.x += 0.5
    walker.keyframe_insert("location", frame=3)
    walker.location.x -= 0.5
    scn.frame_set(1)
    yield scn
    bpy.data.scenes.remove(scn)
    for collection, names in before.items():
        data = getattr(bpy.data, collection)
        for item in [d for d in data if d not in names]:
            data.remove(item)


def _settings_snapshot(scn):
    render = scn.render
    layer = scn.view_layers[0]
    return (
        render.engine,
        render.resolution_x,
        render.resolution_y,
        render.film_transparent,
        render.use_freestyle,
        render.filepath,
        render.image_settings.file_format,
        scn.frame_current,
        layer.use_pass_z,
        scn.display.shading.light,
        len(bpy.data.scenes),
        len(bpy.data.images),
        len(bpy.data.linestyles),
        tuple(scn.objects["Rig rigify"].location),
    )


def _by_hand(scn, frame, world_point):
    """world_to_camera_view done by hand: camera projection matrix, y flipped down."""
    scn.frame_set(frame)
    depsgraph = scn.view_layers[0].depsgraph
    cam = scn.camera
    projection = cam.calc_matrix_camera(depsgraph, x=W, y=H)
    clip = projection @ cam.matrix_world.inverted() @ world_point.to_4d()
    ndc = clip.xyz / clip.w
    return (ndc.x + 1) / 2, 1 - (ndc.y + 1) / 2


def _world_point(scn, frame, rig_name, bone, t=0.0):
    scn.frame_set(frame)
    depsgraph = scn.view_layers[0].depsgraph
    rig = scn.objects[rig_name].evaluated_get(depsgraph)
    pose_bone = rig.pose.bones[bone]
    return rig.matrix_world @ pose_bone.head.lerp(pose_bone.tail, t)


def _read(path):
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def _project_cube(scn, name):
    """Pixel (row, col) of an object's origin in the W x H frame."""
    from bpy_extras.object_utils import world_to_camera_view

    scn.render.resolution_x, scn.render.resolution_y = W, H
    try:
        v = world_to_camera_view(scn, scn.camera, scn.objects[name].matrix_world.translation)
    finally:
        scn.render.resolution_x, scn.render.resolution_y = 1920, 1080
    return int((1 - v.y) * H), int(v.x * W)


# --------------------------------------------------------------------------- keypoints


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
                world = _world_point(scene3d, frame, f"Rig {preset}", names[joint])
                expected = _by_hand(scene3d, frame, world)
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
    from backend.pose import COLORS, LIMB_ALPHA, LIMBS, load_pose_file, render_pose_frames

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


def test_errors_name_the_bad_value(scene3d):
    with pytest.raises(sc.SceneControlError, match="'Nobody'"):
        sc.keypoint_frames(scene3d, [1], W, H, [sc.Character("Nobody")])
    with pytest.raises(sc.SceneControlError, match="'Near' is a MESH"):
        sc.keypoint_frames(scene3d, [1], W, H, [sc.Character("Near")])
    with pytest.raises(sc.SceneControlError, match="frame range is empty"):
        sc.render_depth_frames(scene3d, "/nonexistent", [], W, H)
    with pytest.raises(sc.SceneControlError, match="width"):
        sc.render_depth_frames(scene3d, "/nonexistent", [1], 0, H)
    with pytest.raises(sc.SceneControlError, match="'Near' is a MESH, not a CAMERA"):
        sc.render_depth_frames(scene3d, "/nonexistent", [1], W, H, camera="Near")
    with pytest.raises(sc.SceneControlError, match="unknown scene pass 'normals'"):
        sc.build_scene_controls(
            scene3d, tempfile.mkdtemp(), [sc.SceneControl("normals", "m")], [1], W, H
        )
    empty = bpy.data.scenes.new("t2vz_no_camera")
    try:
        with pytest.raises(sc.SceneControlError, match="has no camera"):
            sc.render_depth_frames(empty, "/nonexistent", [1], W, H)
    finally:
        bpy.data.scenes.remove(empty)


# --------------------------------------------------------------------------- renders


def test_depth_orders_with_distance_and_leaves_the_scene_untouched(scene3d, tmp_path):
    before = _settings_snapshot(scene3d)
    paths = sc.render_depth_frames(scene3d, tmp_path, FRAMES, W, H)
    assert _settings_snapshot(scene3d) == before
    assert [p.name for p in paths] == ["frame_00001.png", "frame_00002.png", "frame_00003.png"]
    image = _read(paths[0])
    assert image.dtype == np.uint16 and image.shape == (H, W, 3)
    depth = image[:, :, 0].astype(float) / 65535
    near, far = depth[_project_cube(scene3d, "Near")], depth[_project_cube(scene3d, "Far")]
    assert near > far > 0.0
    assert near == pytest.approx(1.0, abs=0.02)  # the nearest surface of the shot
    assert depth[2, W // 2] == 0.0  # sky: nothing hit
    # Inverse depth: the near face is 3.5 units away, the far face 13.5 (cubes of size 1).
    far_expected = sc.DEPTH_FLOOR + (1 - sc.DEPTH_FLOOR) * 0.0
    assert far == pytest.approx(far_expected, abs=0.05)
    # Per-shot normalisation: the still cubes keep their values in every frame.
    for path in paths[1:]:
        other = _read(path)[:, :, 0].astype(float) / 65535
        assert other[_project_cube(scene3d, "Near")] == pytest.approx(near, abs=1e-3)


def test_normalize_depth_is_per_shot():
    near = np.full((2, 2), 2.0, np.float32)
    far = np.full((2, 2), 8.0, np.float32)
    far[0, 0] = 1e10  # background
    a, b = sc.normalize_depth([near, far], floor=0.0)
    assert a.max() == 1.0 and b[1, 1] == 0.0 and b[0, 0] == 0.0
    # A frame with only the far surface does not become bright on its own.
    (alone,) = sc.normalize_depth([far], floor=0.2)
    assert alone[1, 1] == pytest.approx(1.0)
    assert sc.normalize_depth([np.full((1, 1), 1e10)])[0].max() == 0.0


def test_cache_reuses_unchanged_frames(scene3d, tmp_path, monkeypatch):
    renders = []
    real = sc._render_still
    monkeypatch.setattr(sc, "_render_still", lambda tmp, path: renders.append(1) or real(tmp, path))
    sc.render_depth_frames(scene3d, tmp_path, FRAMES, W, H)
    assert len(renders) == 3
    sc.render_depth_frames(scene3d, tmp_path, FRAMES, W, H)
    assert len(renders) == 3  # nothing changed: all reused
    far = scene3d.objects["Far"]
    far.location.z += 0.5
    try:
        sc.render_depth_frames(scene3d, tmp_path, [1, 2], W, H)
        assert len(renders) == 5  # the scene changed: re-rendered
        assert sorted(p.name for p in (tmp_path / "depth").iterdir()) == [
            "frame_00001.png",
            "frame_00002.png",
        ]
    finally:
        far.location.z -= 0.5
    sc.render_depth_frames(scene3d, tmp_path, [3], W, H)
    assert len(renders) == 5  # back as it was: frame 3 still cached
    # The same Z pass serves the masks.
    sc.render_mask_frames(scene3d, tmp_path, [3], W, H)
    assert len(renders) == 5


def test_masks_white_on_the_foreground(scene3d, tmp_path):
    everything = _read(sc.render_mask_frames(scene3d, tmp_path / "a", [1], W, H)[0])
    assert everything[_project_cube(scene3d, "Near")].tolist() == [255, 255, 255]
    assert everything[_project_cube(scene3d, "Far")].tolist() == [255, 255, 255]
    assert not everything[2, W // 2].any()
    chosen = _read(sc.render_mask_frames(scene3d, tmp_path / "b", [1], W, H, ["Near"])[0])
    assert chosen[_project_cube(scene3d, "Near")].tolist() == [255, 255, 255]
    assert not chosen[_project_cube(scene3d, "Far")].any()
    with pytest.raises(sc.SceneControlError, match="'Ghost'"):
        sc.render_mask_frames(scene3d, tmp_path / "c", [1], W, H, ["Ghost"])


def test_edge_passes(scene3d, tmp_path):
    before = _settings_snapshot(scene3d)
    paths, detector = sc.render_edge_frames(scene3d, tmp_path, [1, 2], W, H, "canny")
    assert detector == "canny" and paths[0].parent.name == "canny"
    flat = _read(paths[0])
    near, sky = flat[_project_cube(scene3d, "Near")], flat[2, W // 2]
    assert flat.shape == (H, W, 3) and near.tolist() != sky.tolist()
    edges = cv2.Canny(cv2.cvtColor(flat, cv2.COLOR_BGR2GRAY), 100, 200)
    assert edges.any()  # flat shading gives canny clean object outlines
    paths, detector = sc.render_edge_frames(scene3d, tmp_path, [1], W, H, "lines")
    lines = _read(paths[0])
    assert detector == "none" and paths[0].parent.name == "lines"
    assert lines.max() == 255 and (lines[:, :, 0] > 0).mean() < 0.3  # thin white lines
    assert not lines[_project_cube(scene3d, "Near")].any()  # inside the cube: no line
    assert sc.edge_method(scene3d, "edges") == "canny"
    assert _settings_snapshot(scene3d) == before


def test_scene_controlnet_job_runs_through_the_backend(scene3d, tmp_path):
    """Depth + OpenPose from the scene3d, masks for smoothing, on the tiny local models."""
    folder = tmp_path / "scene"
    controls = [
        sc.SceneControl("depth", "builtin:tiny-controlnet", 1.0),
        sc.SceneControl("openpose", "builtin:tiny-controlnet", 0.5),
    ]
    controlnets, masks = sc.build_scene_controls(
        scene3d, folder, controls, [1, 3], 64, 64, masks=True, foreground=["Near"]
    )
    assert [c["detector"] for c in controlnets] == ["none", "none"]
    assert controlnets[1]["control"]["path"].endswith("pose.json")
    assert len(list((folder / "masks").glob("frame_*.png"))) == 2
    job = {
        "prompt": "a robot dancing",
        "out": str(tmp_path / "out"),
        "mode": "controlnet",
        "model": "builtin:tiny",
        "frames": 2,
        "width": 64,
        "height": 64,
        "steps": 2,
        "controlnets": controlnets,
        "smooth_bg": True,
        "masks": masks,
        "device": "cpu",
        "write_mp4": False,
    }
    from backend.protocol import validate_job

    validate_job(job)
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "T2VZ_CACHE_DIR": os.environ.get("T2VZ_CACHE_DIR", str(tmp_path / "m"))}
    result = subprocess.run(
        [sys.executable, "-m", "backend", "generate", "--job", str(job_file)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    frames = sorted((tmp_path / "out").glob("frame_*.png"))
    assert [f.name for f in frames] == ["frame_00001.png", "frame_00002.png"]
    assert _read(frames[0]).shape[:2] == (64, 64)


# --------------------------------------------------------------------------- add-on


class _Layout:
    """Records what a draw hook puts in a panel."""

    def __init__(self):
        self.props = []

    def prop(self, data, name, **_kwargs):
        assert hasattr(data, name), name
        self.props.append(name)


def test_addon_entries_render_scene_passes(addon, scene, scene3d, tmp_path):
    """The panel's "3D Scene" ControlNets become rendered controls in a valid job."""
    from blender_t2vz import operators

    foreground = bpy.data.collections.new("t2vz fg")
    foreground.objects.link(scene3d.objects["Near"])
    settings = scene.t2vz
    settings.mode = "controlnet"
    settings.prompt = "a dancer"
    settings.frames = 2
    settings.smooth_bg = True
    items = []
    for scene_pass in ("DEPTH", "OPENPOSE", "CANNY"):
        item = settings.controlnets.add()
        item.source = "SCENE"
        item.scene_pass = scene_pass
        item.scene_control.scene = scene3d
        item.scene_control.foreground = foreground
        items.append(item)
    items[2].scene_control.edges = "FREESTYLE"
    try:
        plan = operators.plan_from_panel(bpy.context)
        controlnets = plan.job["controlnets"]
        assert [c["detector"] for c in controlnets] == ["none", "none", "none"]
        assert {c["model"] for c in controlnets} == {"builtin:tiny-controlnet"}
        depth, pose, lines = (Path(c["control"]["path"]) for c in controlnets)
        assert (depth.name, pose.name, lines.name) == ("depth", "pose.json", "lines")
        assert len(list(depth.glob("frame_*.png"))) == 2
        assert len(json.loads(pose.read_text())["frames"]) == 2
        masks = Path(plan.job["masks"]["path"])
        mask = _read(masks / "frame_00001.png")
        assert mask[_project_cube(scene3d, "Near")].all()
        assert not mask[_project_cube(scene3d, "Far")].any()
        assert (plan.staging.parent / "scene_cache").is_dir()  # shared between jobs

        items[2].scene_control.edges = "CANNY"
        assert items[2].to_values()["detector"] == "canny"
        layout = _Layout()
        sc.draw_control_settings(layout, bpy.context, items[1])
        assert {"scene", "camera", "characters", "preset", "overrides"} <= set(layout.props)

        items[1].scene_control.overrides = "chin=Head"
        with pytest.raises(sc.SceneControlError, match="unknown keypoint 'chin'"):
            operators.plan_from_panel(bpy.context)
        with pytest.raises(RuntimeError, match="unknown keypoint 'chin'"):  # self.report
            bpy.ops.t2vz.generate()
    finally:
        settings.controlnets.clear()
        bpy.data.collections.remove(foreground)
