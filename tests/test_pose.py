"""OpenPose keypoint files: validation and drawing (backend/media/pose.py)."""

import json

import numpy as np
import pytest

from backend.media.pose import (
    COLORS,
    KEYPOINT_NAMES,
    LIMB_ALPHA,
    LIMBS,
    draw_openpose,
    load_pose_file,
    render_pose_frames,
    stroke_width,
    write_pose_file,
)

W, H = 256, 192


def person(**points):
    """An 18-keypoint person with only the named keypoints set."""
    out = [None] * 18
    for name, xy in points.items():
        out[KEYPOINT_NAMES.index(name)] = list(xy)
    return out


def limb_color(a, b):
    """The expected blended colour of the limb between keypoints a and b on black."""
    index = LIMBS.index((KEYPOINT_NAMES.index(a), KEYPOINT_NAMES.index(b)))
    return np.array([int(LIMB_ALPHA * c) for c in COLORS[index]])


def pixel(image, xy):
    return image[int(round(xy[1] * H)), int(round(xy[0] * W))].astype(int)


def test_limb_midpoints_have_the_limb_colours():
    neck, r_sho, l_sho = (0.5, 0.3), (0.25, 0.3), (0.75, 0.3)
    r_hip, r_knee = (0.4, 0.6), (0.4, 0.9)
    image = draw_openpose(
        [person(neck=neck, r_shoulder=r_sho, l_shoulder=l_sho, r_hip=r_hip, r_knee=r_knee)], W, H
    )
    assert image.shape == (H, W, 3) and image.dtype == np.uint8

    def mid(a, b):
        return ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)

    # neck -> right shoulder is limb 0 (red), neck -> left shoulder limb 1 (orange).
    np.testing.assert_allclose(
        pixel(image, mid(neck, r_sho)), limb_color("neck", "r_shoulder"), atol=1
    )
    np.testing.assert_allclose(
        pixel(image, mid(neck, l_sho)), limb_color("neck", "l_shoulder"), atol=1
    )
    np.testing.assert_allclose(
        pixel(image, mid(r_hip, r_knee)), limb_color("r_hip", "r_knee"), atol=1
    )
    assert tuple(pixel(image, mid(neck, r_sho))) == (153, 0, 0)


def test_keypoints_drawn_at_full_colour_and_scaled_with_size():
    image = draw_openpose([person(r_shoulder=(0.2, 0.2), l_wrist=(0.8, 0.7))], W, H)
    assert tuple(pixel(image, (0.2, 0.2))) == COLORS[KEYPOINT_NAMES.index("r_shoulder")]
    assert tuple(pixel(image, (0.8, 0.7))) == COLORS[KEYPOINT_NAMES.index("l_wrist")]
    # Two unconnected keypoints: no limb between them, black in between.
    assert not image[int(0.45 * H), int(0.5 * W)].any()
    assert (
        stroke_width(512, 512) == 4 and stroke_width(1024, 768) == 6 and stroke_width(64, 64) == 1
    )


def test_missing_keypoints_leave_black():
    assert not draw_openpose([], W, H).any()
    assert not draw_openpose([[None] * 18], W, H).any()
    # A limb with one end missing is not drawn; only the present keypoint's dot is.
    image = draw_openpose([person(neck=(0.5, 0.5))], W, H)
    lit = np.argwhere(image.any(axis=2))
    assert len(lit) > 0
    assert np.abs(lit - [0.5 * H, 0.5 * W]).max() <= stroke_width(W, H) + 1


def test_several_people_and_frames(tmp_path):
    a = person(neck=(0.2, 0.2), r_shoulder=(0.1, 0.2))
    b = person(neck=(0.8, 0.8), r_shoulder=(0.7, 0.8))
    path = write_pose_file(tmp_path / "pose.json", [[a, b], [a], []])
    frames = render_pose_frames(path, W, H)
    assert len(frames) == 3
    red = tuple(limb_color("neck", "r_shoulder"))
    assert tuple(pixel(frames[0], (0.15, 0.2))) == red
    assert tuple(pixel(frames[0], (0.75, 0.8))) == red
    assert tuple(pixel(frames[1], (0.15, 0.2))) == red
    assert not frames[1][int(0.8 * H), int(0.75 * W)].any()
    assert not frames[2].any()


def test_load_pose_file_round_trip(tmp_path):
    frames = [[person(nose=(0, 1), l_ear=(0.5, 0.25))]]
    path = write_pose_file(tmp_path / "p.json", frames)
    loaded = load_pose_file(path)
    assert loaded[0][0][0] == (0.0, 1.0)
    assert loaded[0][0][17] == (0.5, 0.25)
    assert loaded[0][0][1] is None


@pytest.mark.parametrize(
    "data, needle",
    [
        ([], "root"),
        ({"format": "coco17", "frames": [[]]}, "format"),
        ({"format": "openpose18", "frames": []}, "frames"),
        ({"format": "openpose18", "frames": [[]], "extra": 1}, "extra"),
        ({"format": "openpose18", "frames": ["x"]}, "frames[0]"),
        ({"format": "openpose18", "frames": [[[None] * 17]]}, "17 entries"),
        ({"format": "openpose18", "frames": [[[[0.1]] + [None] * 17]]}, "(nose)"),
        ({"format": "openpose18", "frames": [[[None, [0.1, 1.5]] + [None] * 16]]}, "1.5"),
        ({"format": "openpose18", "frames": [[[None, [0.1, "a"]] + [None] * 16]]}, "(neck).y"),
        ({"format": "openpose18", "frames": [[[None, [True, 0.1]] + [None] * 16]]}, "True"),
    ],
)
def test_bad_files_are_refused_naming_the_value(tmp_path, data, needle):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        load_pose_file(path)
    assert needle in str(info.value)


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_pose_file(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pose_file(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="size"):
        draw_openpose([], 0, 10)


# --------------------------------------------------------------------------- hostile files


def test_a_pose_file_linked_to_dev_zero_is_refused_unread(tmp_path):
    import os

    link = tmp_path / "pose.json"
    os.symlink("/dev/zero", link)
    with pytest.raises(ValueError) as info:
        load_pose_file(link)
    assert str(link) in str(info.value) and "not a regular file" in str(info.value)


def test_a_fifo_pose_file_is_refused_without_blocking(tmp_path):
    import os
    import time

    fifo = tmp_path / "pose.json"
    os.mkfifo(fifo)  # nobody ever writes to it: a blocking open or read would hang forever
    started = time.monotonic()
    with pytest.raises(ValueError) as info:
        load_pose_file(fifo)
    assert time.monotonic() - started < 2.0
    assert str(fifo) in str(info.value) and "FIFO" in str(info.value)


def test_a_pose_file_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    import backend.media.pose as pose

    path = write_pose_file(tmp_path / "big.json", [[person(nose=(0.5, 0.5))]] * 50)
    monkeypatch.setattr(pose, "MAX_POSE_BYTES", path.stat().st_size - 1)
    with pytest.raises(ValueError) as info:
        load_pose_file(path)
    assert str(path) in str(info.value) and "limit" in str(info.value)


def test_pose_errors_echo_only_a_short_printable_excerpt(tmp_path):
    secret = "\x1b[2J" + "k" * 5000  # a terminal escape and a long value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "openpose18", "frames": [[[secret] + [None] * 17]]}))
    with pytest.raises(ValueError) as info:
        load_pose_file(path)
    text = str(info.value)
    assert str(path) in text and "\x1b" not in text and "k" * 100 not in text
    assert len(text.splitlines()) == 1
    (tmp_path / "key.json").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk")
    with pytest.raises(ValueError) as info:
        load_pose_file(tmp_path / "key.json")  # not JSON: no excerpt at all
    assert "PRIVATE" not in str(info.value) and "b3Bl" not in str(info.value)
