"""The 3D scene of the scene-control tests, built in a scene of its own and removed after.

A camera, two cubes at different distances, three armatures named like Rigify, Mixamo and
the human meta-rig, animated; helpers that project points by hand to check the passes.
"""

import math

import bpy
import pytest
from mathutils import Vector

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


def mixamo_skeleton(prefix=""):
    """The bones of a Mixamo character: the 67 names Mixamo exports (eyes included), parented.

    ``prefix`` is the FBX namespace: "mixamorig:" from Mixamo, "mixamorig1:" for a second
    import, a character's own ("MyChar:"), or "" where a tool dropped it. Returns
    name -> (head, tail, parent name or None), on BODY's proportions.
    """
    body = {base: BODY[joint] for joint, base in _MIXAMO_JOINTS.items()}
    bones = {}

    def add(name, head, tail, parent):
        bones[prefix + name] = (head, tail, None if parent is None else prefix + parent)

    add("Hips", *body["Hips"], None)
    add("Spine", (0.0, 0.0, 1.05), (0.0, 0.0, 1.2), "Hips")
    add("Spine1", (0.0, 0.0, 1.2), (0.0, 0.0, 1.35), "Spine")
    add("Spine2", (0.0, 0.0, 1.35), (0.0, 0.0, 1.5), "Spine1")
    add("Neck", *body["Neck"], "Spine2")
    add("Head", *body["Head"], "Neck")
    add("HeadTop_End", (0.0, 0.0, 1.95), (0.0, 0.0, 2.05), "Head")
    add("LeftEye", (0.04, -0.1, 1.8), (0.04, -0.15, 1.8), "Head")
    add("RightEye", (-0.04, -0.1, 1.8), (-0.04, -0.15, 1.8), "Head")
    for side, sign in (("Left", 1.0), ("Right", -1.0)):
        add(f"{side}Shoulder", (0.05 * sign, 0.0, 1.45), (0.25 * sign, 0.0, 1.45), "Spine2")
        add(f"{side}Arm", *body[f"{side}Arm"], f"{side}Shoulder")
        add(f"{side}ForeArm", *body[f"{side}ForeArm"], f"{side}Arm")
        add(f"{side}Hand", *body[f"{side}Hand"], f"{side}ForeArm")
        for finger_index, finger in enumerate(("Thumb", "Index", "Middle", "Ring", "Pinky")):
            x = (0.21 + 0.02 * finger_index) * sign
            parent = f"{side}Hand"
            for joint in range(1, 5):
                z = 0.85 - 0.02 * joint
                add(f"{side}Hand{finger}{joint}", (x, 0.0, z), (x, 0.0, z - 0.02), parent)
                parent = f"{side}Hand{finger}{joint}"
        add(f"{side}UpLeg", *body[f"{side}UpLeg"], "Hips")
        add(f"{side}Leg", *body[f"{side}Leg"], f"{side}UpLeg")
        add(f"{side}Foot", *body[f"{side}Foot"], f"{side}Leg")
        toe = ((0.12 * sign, -0.15, 0.0), (0.12 * sign, -0.25, 0.0))
        add(f"{side}ToeBase", *toe, f"{side}Foot")
        add(f"{side}Toe_End", toe[1], (0.12 * sign, -0.3, 0.0), f"{side}ToeBase")
    return bones


# Mixamo's names of BODY's joints.
_MIXAMO_JOINTS = {joint: name.split(":", 1)[1] for joint, name in RIG_NAMES["mixamo"].items()}


def add_cube(scene, name, location, size=1.0):
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


def add_armature(scene, name, bones, location):
    """An armature object built through edit mode.

    ``bones``: name -> (head, tail) or (head, tail, parent name or None).
    """
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
            for bone, (head, tail, *_parent) in bones.items():
                edit = data.edit_bones.new(bone)
                edit.head, edit.tail = head, tail
            for bone, (_head, _tail, *parent) in bones.items():
                if parent and parent[0] is not None:
                    data.edit_bones[bone].parent = data.edit_bones[parent[0]]
            bpy.ops.object.mode_set(mode="OBJECT")
    finally:
        if window and previous is not None:
            window.scene = previous
    return obj


def build_scene3d():
    """The test scene and what bpy.data held before it (for remove_scene3d)."""
    before = {c: set(getattr(bpy.data, c)) for c in ("objects", "meshes", "armatures", "cameras")}
    scn = bpy.data.scenes.new("t2vz_scene_control_test")
    scn.frame_start, scn.frame_end = 1, 3
    scn.render.resolution_x, scn.render.resolution_y = 1920, 1080
    cam = bpy.data.objects.new("T2VZ Cam", bpy.data.cameras.new("T2VZ Cam"))
    scn.collection.objects.link(cam)
    scn.camera = cam
    cam.location = (0.0, -8.0, 1.0)
    cam.rotation_euler = (math.radians(90.0), 0.0, 0.0)
    add_cube(scn, "Near", (-0.8, -4.0, 1.0))  # 4 units from the camera
    add_cube(scn, "Far", (1.5, 6.0, 1.0))  # 14 units from the camera
    for preset, names in RIG_NAMES.items():
        bones = {names[joint]: ends for joint, ends in BODY.items()}
        add_armature(scn, f"Rig {preset}", bones, RIG_PLACES[preset])
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
    return scn, before


def remove_scene3d(scn, before):
    """Remove the scene and every datablock made since ``before``."""
    bpy.data.scenes.remove(scn)
    for collection, names in before.items():
        data = getattr(bpy.data, collection)
        for item in [d for d in data if d not in names]:
            data.remove(item)


def settings_snapshot(scn):
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
        # Blender's own "Render Result" appears with the first render after File > New.
        len([i for i in bpy.data.images if i.type != "RENDER_RESULT"]),
        len(bpy.data.linestyles),
        tuple(scn.objects["Rig rigify"].location),
    )


def by_hand(scn, frame, world_point):
    """world_to_camera_view done by hand: camera projection matrix, y flipped down."""
    scn.frame_set(frame)
    depsgraph = scn.view_layers[0].depsgraph
    cam = scn.camera
    projection = cam.calc_matrix_camera(depsgraph, x=W, y=H)
    clip = projection @ cam.matrix_world.inverted() @ world_point.to_4d()
    ndc = clip.xyz / clip.w
    return (ndc.x + 1) / 2, 1 - (ndc.y + 1) / 2


def world_point(scn, frame, rig_name, bone, t=0.0):
    scn.frame_set(frame)
    depsgraph = scn.view_layers[0].depsgraph
    rig = scn.objects[rig_name].evaluated_get(depsgraph)
    pose_bone = rig.pose.bones[bone]
    return rig.matrix_world @ pose_bone.head.lerp(pose_bone.tail, t)


def read(path):
    cv2 = pytest.importorskip("cv2")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def project_cube(scn, name):
    """Pixel (row, col) of an object's origin in the W x H frame."""
    from bpy_extras.object_utils import world_to_camera_view

    scn.render.resolution_x, scn.render.resolution_y = W, H
    try:
        v = world_to_camera_view(scn, scn.camera, scn.objects[name].matrix_world.translation)
    finally:
        scn.render.resolution_x, scn.render.resolution_y = 1920, 1080
    return int((1 - v.y) * H), int(v.x * W)
