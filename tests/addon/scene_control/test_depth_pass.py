"""The depth pass (blender_t2vz/scene_control/depth.py), rendered headless with Cycles."""

import bpy
import numpy as np
import pytest
from mathutils import Vector

from blender_t2vz import scene_control as sc

from .rig_scene import FRAMES, H, W, add_cube, project_cube, read, settings_snapshot


def test_depth_orders_with_distance_and_leaves_the_scene_untouched(scene3d, tmp_path):
    before = settings_snapshot(scene3d)
    paths = sc.render_depth_frames(scene3d, tmp_path, FRAMES, W, H)
    assert settings_snapshot(scene3d) == before
    assert [p.name for p in paths] == ["frame_00001.png", "frame_00002.png", "frame_00003.png"]
    image = read(paths[0])
    assert image.dtype == np.uint16 and image.shape == (H, W, 3)
    depth = image[:, :, 0].astype(float) / 65535
    near, far = depth[project_cube(scene3d, "Near")], depth[project_cube(scene3d, "Far")]
    assert near > far > 0.0
    assert near == pytest.approx(1.0, abs=0.02)  # the nearest surface of the shot
    assert depth[2, W // 2] == 0.0  # sky: nothing hit
    # Inverse depth: the near face is 3.5 units away, the far face 13.5 (cubes of size 1).
    far_expected = sc.DEPTH_FLOOR + (1 - sc.DEPTH_FLOOR) * 0.0
    assert far == pytest.approx(far_expected, abs=0.05)
    # Per-shot normalisation: the still cubes keep their values in every frame.
    for path in paths[1:]:
        other = read(path)[:, :, 0].astype(float) / 65535
        assert other[project_cube(scene3d, "Near")] == pytest.approx(near, abs=1e-3)


def _view_depth(scene, point) -> float:
    """Planar depth of a world point: its distance along the camera's view axis (-Z)."""
    cam = scene.camera.matrix_world
    view_axis = -cam.to_3x3().col[2].normalized()
    return float((Vector(point) - cam.translation).dot(view_axis))


def test_depth_of_a_surface_between_the_extremes_is_inverse_depth_with_the_floor(scene3d, tmp_path):
    """A third cube between the two: its value is the documented mapping computed by hand.

    The extremes are forced by the per-shot normalisation (near 1, far DEPTH_FLOOR) however
    the mapping goes; only a surface in between tells inverse from linear depth, and shows
    the floor. Cubes are size 1 facing the camera (looking along +Y), so a front face is the
    centre less 0.5 along the view axis.
    """
    mid = add_cube(scene3d, "Mid", (0.0, 1.0, 1.0))  # between the two, seen between them
    try:
        front = {
            name: _view_depth(scene3d, scene3d.objects[name].location - Vector((0, 0.5, 0)))
            for name in ("Near", "Mid", "Far")
        }
        assert front == pytest.approx({"Near": 3.5, "Mid": 8.5, "Far": 13.5})
        # The farthest surface of the shot: the Far cube's left face (x = 1.0, seen edge-on
        # from the camera at x = 0) runs from its front face (13.5) to its back edge (14.5);
        # which depth of it the pixels sample is up to the renderer, so the hand value is
        # an interval over that range.
        near, farthest = front["Near"], (front["Far"], front["Far"] + 1.0)

        def by_hand(z: float, far: float, floor: float = sc.DEPTH_FLOOR) -> float:
            scaled = (1 / z - 1 / far) / (1 / near - 1 / far)
            return floor + (1 - floor) * scaled

        expected = sorted(by_hand(front["Mid"], far) for far in farthest)  # 0.285 .. 0.302
        paths = sc.render_depth_frames(scene3d, tmp_path, FRAMES, W, H)
        step = 1 / 65535  # one step of the 16-bit PNG
        for path in paths:
            depth = read(path)[:, :, 0].astype(float) / 65535
            value = depth[project_cube(scene3d, "Mid")]
            assert expected[0] - step <= value <= expected[1] + step
            assert depth[project_cube(scene3d, "Near")] == pytest.approx(1.0, abs=step)
        # Linear depth would give 0.55 .. 0.59 here and no floor 0.206 .. 0.225 (both
        # checked against planted bugs in depth.py).
    finally:
        bpy.data.objects.remove(mid)


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


def test_each_frame_renders_its_own_frame_of_the_animation(scene3d, tmp_path):
    """A cube moving left to right is where it is at each frame, whatever the context
    scene's frame (the render operator, given another scene, renders the context's)."""
    mover = add_cube(scene3d, "Mover", (-2.0, -1.0, 2.2), 0.6)  # above the near cube
    mover.keyframe_insert("location", frame=1)
    mover.location.x = 2.0
    mover.keyframe_insert("location", frame=3)
    try:
        places = {}
        for frame in (1, 3):
            scene3d.frame_set(frame)
            places[frame] = project_cube(scene3d, "Mover")
        scene3d.frame_set(1)
        bpy.context.scene.frame_set(1)
        depth = [read(p)[:, :, 0] for p in sc.render_depth_frames(scene3d, tmp_path, [1, 3], W, H)]
        # The cube at its own place only; at the other frame's place there is sky.
        assert depth[0][places[1]] > 0 and depth[0][places[3]] == 0
        assert depth[1][places[3]] > 0 and depth[1][places[1]] == 0
    finally:
        bpy.data.objects.remove(mover)
        scene3d.frame_set(1)
