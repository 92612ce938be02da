"""What an artist builds in a new .blend before a scene-driven job: a camera, an animated
Mixamo skeleton (bones only, as an FBX of a Mixamo animation imports) and, if asked, a
mesh prop for the depth and edge passes to see. Everything goes into ``scene`` itself."""

import math

import bpy
from mathutils import Vector
from scene_control.rig_scene import add_armature, add_cube, mixamo_skeleton

RIG = "Armature"
PROP = "Prop"


def build_shot(scene: bpy.types.Scene, prop: bool = True, frames: int = 8) -> bpy.types.Object:
    """A camera looking at a Mixamo rig whose left arm rises over ``frames`` frames; a cube
    beside it when ``prop``. Returns the armature."""
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(cam)
    scene.camera = cam
    cam.location = (0.0, -6.0, 1.0)
    cam.rotation_euler = (math.radians(90.0), 0.0, 0.0)
    rig = add_armature(scene, RIG, mixamo_skeleton("mixamorig:"), (0.0, 0.0, 0.0))
    bone = rig.pose.bones["mixamorig:LeftArm"]
    bone.keyframe_insert("location", frame=1)
    rest = rig.data.bones["mixamorig:LeftArm"].matrix_local.to_3x3()
    bone.location = rest.inverted() @ Vector((0.3, 0.0, 0.3))
    bone.keyframe_insert("location", frame=frames)
    if prop:
        add_cube(scene, PROP, (0.9, -1.0, 0.5), size=0.8)
    scene.frame_start, scene.frame_end = 1, frames
    scene.frame_set(1)
    return rig
