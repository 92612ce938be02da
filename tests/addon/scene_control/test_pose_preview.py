"""The OpenPose preview drawn in Blender with numpy (blender_t2vz/scene_control/openpose/
draw.py), against the backend's cv2 drawing of the same keypoints."""

import json

import numpy as np
import pytest

from blender_t2vz.scene_control.openpose import draw

cv2 = pytest.importorskip("cv2")
from backend.media import pose  # noqa: E402  (needs cv2)


def test_the_tables_are_the_backends() -> None:
    assert draw.LIMBS == pose.LIMBS and draw.COLORS == pose.COLORS
    assert draw.LIMB_ALPHA == pose.LIMB_ALPHA
    for size in ((64, 64), (512, 384), (1024, 768)):
        assert draw.stroke_width(*size) == pose.stroke_width(*size)


def _people(rng: np.random.Generator) -> list:
    """Two people, each keypoint left out with chance 0.15."""
    return [
        [
            None if rng.random() < 0.15 else (rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9))
            for _ in range(18)
        ]
        for _ in range(2)
    ]


@pytest.mark.parametrize("size", [(64, 64), (88, 64), (512, 384)])
def test_the_preview_draws_what_the_backend_draws(size) -> None:
    """Measured over these 20 seeded poses of two people: the drawn pixels overlap with
    IoU 0.906 at least (64x64; 0.95 at 512x384) and 0.956 of the pixels agree within 2
    levels on average (64x64; 0.993 at 512x384). cv2 fills a polygon of the ellipse, the
    preview the ellipse itself: they differ at the rims."""
    rng = np.random.default_rng(0)
    ious, agree = [], []
    for _ in range(20):
        people = _people(rng)
        ours, theirs = draw.draw_pose(people, *size), pose.draw_openpose(people, *size)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        drawn, backend = ours.any(axis=2), theirs.any(axis=2)
        ious.append((drawn & backend).sum() / (drawn | backend).sum())
        agree.append((np.abs(ours.astype(int) - theirs.astype(int)).max(axis=2) <= 2).mean())
        for person in people:  # every keypoint's centre has the backend's colour
            for point in person:
                if point is not None:
                    x, y = round(point[0] * size[0]), round(point[1] * size[1])
                    assert tuple(ours[y, x]) == tuple(theirs[y, x])
    assert min(ious) >= 0.88 and float(np.mean(agree)) >= 0.94


def test_a_pose_file_frame_becomes_a_png(tmp_path) -> None:
    person = [None] * 18
    person[1], person[2] = (0.25, 0.5), (0.75, 0.5)  # neck and right shoulder: limb 0
    path = tmp_path / "pose.json"
    path.write_text(json.dumps({"format": "openpose18", "frames": [[], [person]]}))
    png = draw.pose_preview(path, 64, 32, tmp_path / "preview.png", frame=1)
    picture = cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB)
    assert picture.shape == (32, 64, 3)
    assert tuple(picture[16, 16]) == draw.COLORS[1] and tuple(picture[16, 48]) == draw.COLORS[2]
    assert picture[16, 32].tolist() == [153, 0, 0]  # limb 0's red, blended at 0.6
    assert not picture[:8].any()  # nothing above the limb
    assert (picture == draw.draw_pose([person], 64, 32)).all()
    with pytest.raises(draw.SceneControlError, match="no frame 2"):
        draw.pose_preview(path, 64, 32, tmp_path / "again.png", frame=2)
