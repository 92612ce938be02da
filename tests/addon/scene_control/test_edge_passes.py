"""The edge passes (blender_t2vz/scene_control/edges.py): flat shading for canny, Freestyle."""

import pytest

from blender_t2vz import scene_control as sc

from .rig_scene import H, W, project_cube, read, settings_snapshot

cv2 = pytest.importorskip("cv2")


def test_edge_passes(scene3d, tmp_path):
    before = settings_snapshot(scene3d)
    paths, detector = sc.render_edge_frames(scene3d, tmp_path, [1, 2], W, H, "canny")
    assert detector == "canny" and paths[0].parent.name == "canny"
    flat = read(paths[0])
    near, sky = flat[project_cube(scene3d, "Near")], flat[2, W // 2]
    assert flat.shape == (H, W, 3) and near.tolist() != sky.tolist()
    edges = cv2.Canny(cv2.cvtColor(flat, cv2.COLOR_BGR2GRAY), 100, 200)
    assert edges.any()  # flat shading gives canny clean object outlines
    paths, detector = sc.render_edge_frames(scene3d, tmp_path, [1], W, H, "lines")
    lines = read(paths[0])
    assert detector == "none" and paths[0].parent.name == "lines"
    assert lines.max() == 255 and (lines[:, :, 0] > 0).mean() < 0.3  # thin white lines
    assert not lines[project_cube(scene3d, "Near")].any()  # inside the cube: no line
    assert sc.edge_method(scene3d, "edges") == "canny"
    assert settings_snapshot(scene3d) == before
