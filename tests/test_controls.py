"""backend/media/controls.py: control frames, the canny detector, pose files, optional detectors."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import backend.media.controls as controls
from backend.media.controls import (
    DetectorUnavailableError,
    apply_detector,
    canny,
    load_control_frames,
)
from backend.media.video_io import write_png
from backend.protocol import ControlNetSpec, VideoInput


def square_image(size: int = 64, lo: int = 16, hi: int = 48) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[lo:hi, lo:hi] = 255
    return image


def test_canny_draws_white_edges_on_black() -> None:
    edges = canny(square_image())
    assert edges.shape == (64, 64, 3) and edges.dtype == np.uint8
    assert set(np.unique(edges).tolist()) == {0, 255}
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 1] == edges[..., 2]).all()
    on = np.argwhere(edges[..., 0] == 255)
    assert on[:, 0].min() >= 14 and on[:, 0].max() <= 49  # only around the square's border
    assert edges[20:44, 20:44].max() == 0 and edges[:10].max() == 0
    assert canny(np.full((32, 32, 3), 128, np.uint8)).max() == 0


def test_detector_none_keeps_the_image() -> None:
    image = square_image()
    assert apply_detector("none", image) is image
    assert np.array_equal(apply_detector("canny", image), canny(image))


@pytest.fixture
def no_controlnet_aux(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """controlnet-aux not importable (as on machines without torchvision)."""
    monkeypatch.setitem(sys.modules, "controlnet_aux", None)
    controls._aux_detector.cache_clear()
    yield
    controls._aux_detector.cache_clear()


@pytest.mark.parametrize("name", ["hed", "lineart", "mlsd"])
def test_missing_controlnet_aux_gives_a_helpful_error(no_controlnet_aux: None, name: str) -> None:
    with pytest.raises(DetectorUnavailableError) as info:
        apply_detector(name, square_image(), allow_pickle=True)
    message = str(info.value)
    assert name in message and "controlnet-aux" in message and "canny" in message
    assert "openpose" in message  # the detectors that need no extra


@pytest.mark.parametrize("name", ["hed", "lineart", "mlsd"])
def test_controlnet_aux_detectors_run_only_where_pickles_are_allowed(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    loaded: list[str] = []
    monkeypatch.setattr(controls, "_aux_detector", lambda n: loaded.append(n))
    with pytest.raises(DetectorUnavailableError) as info:
        apply_detector(name, square_image())
    message = str(info.value)
    assert f"{name!r}" in message and "pickled" in message and "--allow-pickle" in message
    assert "Allow Pickled Weights" in message
    assert loaded == []  # refused before controlnet-aux is even imported


@pytest.mark.parametrize("name", ["openpose", "depth"])
def test_pose_and_depth_run_the_transformers_detectors(name: str) -> None:
    calls = []

    def run(detector, models, images):
        calls.append((detector, models, [i.shape for i in images]))
        return [np.full_like(i, 7) for i in images]

    out = apply_detector(name, square_image(), run, {"x": "y"})
    assert calls == [(name, {"x": "y"}, [(64, 64, 3)])] and (out == 7).all()


def test_detector_output_is_resized_to_the_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fake_detector(name: str):
        seen.append(name)
        return lambda image: np.full((32, 48, 3), 9, np.uint8)

    monkeypatch.setattr(controls, "_aux_detector", fake_detector)
    out = apply_detector("hed", square_image(64), allow_pickle=True)
    assert seen == ["hed"] and out.shape == (64, 64, 3) and (out == 9).all()


def test_control_video_frames_go_through_the_detector(tmp_path: Path) -> None:
    folder = tmp_path / "control"
    folder.mkdir()
    for i in range(4):
        write_png(folder / f"c{i}.png", square_image(64, 8 + 4 * i, 40 + 4 * i))
    spec = ControlNetSpec("m", VideoInput(str(folder), start=1, stride=2.0), detector="canny")
    frames = load_control_frames(spec, [0, 1], 64, 64)
    assert sorted(frames) == [0, 1]
    assert np.array_equal(frames[0], canny(square_image(64, 12, 44)))
    assert np.array_equal(frames[1], canny(square_image(64, 20, 52)))
    plain = load_control_frames(ControlNetSpec("m", VideoInput(str(folder))), [2], 64, 64)
    assert np.array_equal(plain[2], square_image(64, 16, 48))


def person(x: float) -> list:
    """An 18-keypoint person: nose, neck and shoulders around x."""
    points: list = [None] * 18
    points[0], points[1] = [x, 0.2], [x, 0.35]
    points[2], points[5] = [x - 0.1, 0.35], [x + 0.1, 0.35]
    return points


def test_pose_files_are_drawn_by_backend_pose(tmp_path: Path) -> None:
    import backend.media.pose as pose

    path = pose.write_pose_file(tmp_path / "walk.json", [[person(0.2 + 0.1 * i)] for i in range(4)])
    spec = ControlNetSpec("m", VideoInput(str(path), start=1), detector="canny")
    frames = load_control_frames(spec, [0, 2], 96, 64)
    drawn = pose.render_pose_frames(path, 96, 64)
    assert sorted(frames) == [0, 2]
    # Keypoint files are drawn as they are: the detector is not applied to them.
    assert np.array_equal(frames[0], drawn[1]) and np.array_equal(frames[2], drawn[3])
    assert frames[0].shape == (64, 96, 3) and frames[0].max() > 0
    assert not np.array_equal(frames[0], frames[2])
    with pytest.raises(ValueError, match="4 frames; frame 4"):
        load_control_frames(spec, [3], 96, 64)


def test_control_frames_follow_the_jobs_fit(tmp_path: Path) -> None:
    """A 2:1 control read into a square: "pad" keeps all of it between black bars, "crop"
    fills the square with its middle (the job's fit reaches the control video)."""
    wide = np.full((32, 64, 3), 200, np.uint8)
    write_png(tmp_path / "wide.png", wide)
    spec = ControlNetSpec("m", VideoInput(str(tmp_path / "wide.png")))
    padded = load_control_frames(spec, [0], 64, 64, fit="pad")[0]
    cropped = load_control_frames(spec, [0], 64, 64, fit="crop")[0]
    assert padded[:16].max() == 0 and padded[48:].max() == 0  # bars above and below
    assert (padded[16:48] == 200).all()
    assert (cropped == 200).all()
