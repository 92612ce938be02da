"""The edge passes (blender_t2vz/scene_control/edges.py): flat shading for canny, Freestyle."""

import itertools

import numpy as np
import pytest
from mathutils import Vector

from blender_t2vz import scene_control as sc

from .rig_scene import H, W, by_hand, project_cube, read, settings_snapshot

cv2 = pytest.importorskip("cv2")


def test_edge_passes(scene3d, tmp_path):
    before = settings_snapshot(scene3d)
    paths, detector = sc.render_edge_frames(scene3d, tmp_path, [1, 2], W, H, "canny")
    assert detector == "canny" and paths[0].parent.name == "canny"
    flat = read(paths[0])
    near, sky = flat[project_cube(scene3d, "Near")], flat[2, W // 2]
    assert flat.shape == (H, W, 3) and near.tolist() != sky.tolist()
    edges = cv2.Canny(cv2.cvtColor(flat, cv2.COLOR_BGR2GRAY), 100, 200)
    _assert_edges_on_outlines(scene3d, edges)
    paths, detector = sc.render_edge_frames(scene3d, tmp_path, [1], W, H, "lines")
    lines = read(paths[0])
    assert detector == "none" and paths[0].parent.name == "lines"
    assert lines.max() == 255 and (lines[:, :, 0] > 0).mean() < 0.3  # thin white lines
    assert not lines[project_cube(scene3d, "Near")].any()  # inside the cube: no line
    assert sc.edge_method(scene3d, "edges") == "canny"
    assert settings_snapshot(scene3d) == before


def _outline(scene, name: str, frame: int = 1) -> np.ndarray:
    """The silhouette of a unit cube in pixel coordinates (pixel centres at integers).

    A convex body's silhouette is the convex hull of its projected corners; the corners
    are projected by hand (rig_scene.by_hand: the camera matrix, y down).
    """
    obj = scene.objects[name]
    corners = []
    for corner in itertools.product((-0.5, 0.5), repeat=3):
        u, v = by_hand(scene, frame, obj.matrix_world @ Vector(corner))
        corners.append((u * W - 0.5, v * H - 0.5))
    return cv2.convexHull(np.array(corners, np.float32))[:, 0]


def _assert_edges_on_outlines(scene, edges: np.ndarray) -> None:
    """Canny's edges of the flat pass are the cubes' outlines, and Near's outline is found.

    On the outline: within 1 px, as canny marks one of the two pixels astride a step (the
    pass's FXAA leaves them within 0.61 px here, measured). The front/side face border of
    Near lies 2.5 px inside its silhouette, so shading that told the faces apart (or a
    shifted or rescaled render) puts edges beyond that. Found: every point of Near's
    outline inside the frame has an edge pixel within 1.5 px (1 px plus half a pixel for
    the diagonal step of a slanted line).
    """
    near, far = _outline(scene, "Near"), _outline(scene, "Far")
    rows, cols = np.nonzero(edges)
    assert rows.size
    for r, c in zip(rows, cols, strict=True):
        point = (float(c), float(r))
        inside_near = cv2.pointPolygonTest(near, point, True)  # > 0 inside, < 0 outside
        inside_far = cv2.pointPolygonTest(far, point, True)
        assert min(abs(inside_near), abs(inside_far)) <= 1.0, (r, c, inside_near, inside_far)
    # Near's silhouette, where it lies in the frame, has an edge within 1.5 px all along.
    edge_points = np.stack([cols, rows], axis=1).astype(float)
    missed = []
    for a, b in zip(near, np.roll(near, -1, axis=0), strict=True):
        for t in np.linspace(0.0, 1.0, 50):
            point = a + t * (b - a)
            in_frame = 1 <= point[0] <= W - 2 and 1 <= point[1] <= H - 2
            if in_frame and np.hypot(*(edge_points - point).T).min() > 1.5:
                missed.append(tuple(point))
    assert not missed, missed[:5]
