"""backend/media/detectors.py and backend/models/detectors.py: OpenPose from VitPose
keypoints, depth from Depth Anything, their weights from safetensors through the hub.

Keypoint conversion and drawing are checked on hand-made arrays; the models are tiny
random-weight ones (tests/tiny_detectors.py) served by the Hub stand-in or read from a
folder, loaded by the real code with torch.load made to fail.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fakehub import FakeHub, use_in_process
from tiny_detectors import QUERIES, build_all, repo_files

import backend.media.detectors as detectors
from backend.media.controls import load_control_frames
from backend.media.detectors import (
    DetectorRun,
    OutputCache,
    coco_to_openpose,
    depth_to_image,
    detect_poses,
    openpose_people,
    weights_used,
)
from backend.media.pose import COLORS, draw_openpose, render_pose_frames, write_pose_file
from backend.media.video_io import write_png
from backend.models.detectors import load_detector
from backend.models.hub import DownloadHooks
from backend.models.loading import ModelCache, ModelLoadError
from backend.protocol import DETECTOR_MODELS, KEYPOINT_NAMES, ControlNetSpec, VideoInput

CPU = torch.device("cpu")
COCO_NAMES = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
# OpenPose name (protocol.KEYPOINT_NAMES) -> COCO name, written out by hand.
OPENPOSE_FROM_COCO = {
    "nose": "nose",
    "r_shoulder": "right_shoulder",
    "r_elbow": "right_elbow",
    "r_wrist": "right_wrist",
    "l_shoulder": "left_shoulder",
    "l_elbow": "left_elbow",
    "l_wrist": "left_wrist",
    "r_hip": "right_hip",
    "r_knee": "right_knee",
    "r_ankle": "right_ankle",
    "l_hip": "left_hip",
    "l_knee": "left_knee",
    "l_ankle": "left_ankle",
    "r_eye": "right_eye",
    "l_eye": "left_eye",
    "r_ear": "right_ear",
    "l_ear": "left_ear",
}


def standing(x: float, width: int = 200, height: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """A person around pixel column ``x``: every COCO keypoint at its own place, all sure."""
    keypoints = np.array([[x + 3 * i - 24, 5 + 5 * i] for i in range(17)], np.float32)
    assert keypoints[:, 0].min() >= 0 and keypoints[:, 0].max() <= width
    assert keypoints[:, 1].max() <= height
    return keypoints, np.full(17, 0.9, np.float32)


# --------------------------------------------------------------------------- conversion


def test_coco_keypoints_land_on_their_openpose_names() -> None:
    keypoints, scores = standing(100)
    person = coco_to_openpose(keypoints, scores, 200, 100)
    assert len(person) == len(KEYPOINT_NAMES) == 18
    for name, coco in OPENPOSE_FROM_COCO.items():
        x, y = keypoints[COCO_NAMES.index(coco)]
        assert person[KEYPOINT_NAMES.index(name)] == pytest.approx((x / 200, y / 100)), name


def test_the_neck_is_the_midpoint_of_the_shoulders() -> None:
    keypoints, scores = standing(100)
    left = keypoints[COCO_NAMES.index("left_shoulder")]
    right = keypoints[COCO_NAMES.index("right_shoulder")]
    neck = coco_to_openpose(keypoints, scores, 200, 100)[KEYPOINT_NAMES.index("neck")]
    assert neck == pytest.approx(((left[0] + right[0]) / 400, (left[1] + right[1]) / 200))


def test_low_confidence_and_off_frame_points_are_left_out() -> None:
    keypoints, scores = standing(100)
    scores[COCO_NAMES.index("left_wrist")] = 0.29  # under the 0.3 threshold
    scores[COCO_NAMES.index("right_shoulder")] = 0.1  # and the neck goes with it
    keypoints[COCO_NAMES.index("nose")] = (-2.0, 10.0)  # off the frame
    person = coco_to_openpose(keypoints, scores, 200, 100)
    missing = {KEYPOINT_NAMES[i] for i, p in enumerate(person) if p is None}
    assert missing == {"l_wrist", "r_shoulder", "neck", "nose"}
    scores[:] = 0.3  # the threshold itself is sure enough
    keypoints[COCO_NAMES.index("nose")] = (5.0, 10.0)
    assert all(p is not None for p in coco_to_openpose(keypoints, scores, 200, 100))


def test_several_people_and_nobody_with_no_sure_point() -> None:
    a, b, ghost = standing(60), standing(150), standing(100)
    ghost[1][:] = 0.05
    people = openpose_people([a, ghost, b], 200, 100)
    assert people == [coco_to_openpose(*a, 200, 100), coco_to_openpose(*b, 200, 100)]
    assert people[0] != people[1]
    assert openpose_people([], 200, 100) == [] and openpose_people([ghost], 200, 100) == []


def test_bad_keypoint_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(17, 2\) keypoints.*\(2, 2\)"):
        coco_to_openpose(np.zeros((2, 2)), np.zeros(2), 64, 64)


def test_detected_people_draw_exactly_as_the_armature_pass_draws_them(tmp_path: Path) -> None:
    """The same points through a pose file (what the armature scene pass writes) give the
    same pixels: limb colours, the neck, the widths at the job's size."""
    people = openpose_people([standing(60), standing(150)], 200, 100)
    drawn = draw_openpose(people, 512, 256)
    pose_file = write_pose_file(tmp_path / "rig.json", [[list(p) for p in people]])
    assert np.array_equal(drawn, render_pose_frames(pose_file, 512, 256)[0])
    neck = people[0][KEYPOINT_NAMES.index("neck")]
    cx, cy = round(neck[0] * 512), round(neck[1] * 256)
    assert tuple(drawn[cy, cx]) == COLORS[KEYPOINT_NAMES.index("neck")] == (255, 85, 0)
    # At 256 px the annotator's 4 px radius (512 px) halves: 2 px from the centre is still
    # the neck's dot, 3 px is not.
    assert tuple(drawn[cy, cx + 2]) == (255, 85, 0) and tuple(drawn[cy - 3, cx]) != (255, 85, 0)


# --------------------------------------------------------------------------- depth


def test_depth_is_bright_where_near() -> None:
    """Depth Anything predicts relative inverse depth: the larger, the nearer."""
    disparity = np.full((32, 48), 2.0, np.float32)
    disparity[8:16, 8:16] = 10.0  # a near square
    disparity[:, 40:] = 0.5  # a far wall
    image = depth_to_image(disparity)
    assert image.shape == (32, 48, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 2]).all()
    assert (image[8:16, 8:16] == 255).all() and (image[:, 40:] == 0).all()
    assert 0 < image[0, 0, 0] < 255  # in between
    assert image[0, 0, 0] == round((2.0 - 0.5) / 9.5 * 255)


def test_flat_or_broken_depth_is_black() -> None:
    assert depth_to_image(np.full((4, 4), 3.0)).max() == 0
    broken = np.ones((4, 4))
    broken[0, 0] = np.nan
    assert depth_to_image(broken).max() == 0


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny detector models in folders (person, nobody, pose, depth)."""
    return build_all(tmp_path_factory.mktemp("tiny-detectors"))


@pytest.fixture
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> list:
    """torch.load raises: detector weights must never be unpickled."""
    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    return calls


def local(tiny: dict[str, Path], person: str = "person") -> dict[str, str]:
    return {"person": str(tiny[person]), "pose": str(tiny["pose"])}


def frame(seed: int, width: int = 96, height: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_pose_models_find_several_people(tiny: dict[str, Path], no_torch_load: list) -> None:
    models = load_detector("openpose", local(tiny), CPU)
    poses = detect_poses(models, [frame(0), frame(1, 48, 80)])
    assert [len(p) for p in poses] == [QUERIES, QUERIES]  # every query sees a person
    for keypoints, scores in poses[1]:
        assert keypoints.shape == (17, 2) and scores.shape == (17,)
    assert no_torch_load == []


def test_openpose_frames_are_drawn_at_the_frame_size(tiny: dict[str, Path]) -> None:
    run = DetectorRun(outputs=OutputCache())
    images = [frame(0), frame(1, 48, 80)]
    out = run("openpose", local(tiny), images)
    models = load_detector("openpose", local(tiny), CPU)
    for image, poses, drawn in zip(images, detect_poses(models, images), out, strict=True):
        height, width = image.shape[:2]
        assert drawn.shape == (height, width, 3) and drawn.dtype == np.uint8
        assert np.array_equal(
            drawn, draw_openpose(openpose_people(poses, width, height), width, height)
        )


def test_a_frame_with_nobody_is_black_with_one_warning_per_job(
    tiny: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "backend.media.detectors")
    outputs = OutputCache()
    run = DetectorRun(outputs=outputs, batch=2)
    out = run("openpose", local(tiny, "nobody"), [frame(i) for i in range(5)])
    assert all(image.shape == (64, 96, 3) and image.max() == 0 for image in out)
    assert [r.message for r in caplog.records] == [detectors.NOBODY]
    caplog.clear()
    again = DetectorRun(outputs=outputs)  # the next job: from the cache, warned once again
    again("openpose", local(tiny, "nobody"), [frame(0), frame(1)])
    assert outputs.hits == 2 and [r.message for r in caplog.records] == [detectors.NOBODY]


def test_depth_model_gives_near_bright_frames(tiny: dict[str, Path], no_torch_load: list) -> None:
    run = DetectorRun(outputs=OutputCache())
    out = run("depth", {"depth": str(tiny["depth"])}, [frame(0), frame(1, 42, 70)])
    assert [o.shape for o in out] == [(64, 96, 3), (70, 42, 3)]
    for image in out:  # scaled to each frame's range
        assert image.min() == 0 and image.max() == 255
        assert (image[..., 0] == image[..., 1]).all()
    assert no_torch_load == []


def test_a_metric_depth_model_is_turned_so_near_stays_bright(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """Metric models predict distance (larger is farther): their maps are inverted."""
    import shutil

    metric = tmp_path / "metric"
    shutil.copytree(tiny["depth"], metric)
    config = json.loads((metric / "config.json").read_text())
    config["depth_estimation_type"], config["max_depth"] = "metric", 20
    (metric / "config.json").write_text(json.dumps(config))
    relative = load_detector("depth", {"depth": str(tiny["depth"])}, CPU)
    model = load_detector("depth", {"depth": str(metric)}, CPU)
    assert relative.near_is_larger and not model.near_is_larger
    image = frame(3)
    (distance,) = detectors.estimate_depth(model, [image])
    (out,) = DetectorRun(load=lambda *_: model, outputs=OutputCache())(
        "depth", {"depth": str(metric)}, [image]
    )
    assert np.array_equal(out, depth_to_image(-distance))
    far = np.unravel_index(np.argmax(distance), distance.shape)
    assert out[far][0] == 0  # the farthest point is black


def test_outputs_are_cached_by_frame_size_and_weights(tiny: dict[str, Path]) -> None:
    loads: list = []

    def load(name: str, weights: dict) -> object:
        loads.append((name, weights))
        return load_detector(name, weights, CPU)

    outputs = OutputCache()
    run = DetectorRun(load=load, outputs=outputs)
    weights = {"depth": str(tiny["depth"])}
    first = run("depth", weights, [frame(0), frame(1)])
    again = DetectorRun(load=load, outputs=outputs)("depth", weights, [frame(1), frame(0)])
    assert len(loads) == 1 and outputs.hits == 2  # a regenerate runs no model
    assert np.array_equal(again[0], first[1]) and np.array_equal(again[1], first[0])
    run("depth", weights, [frame(0, 64, 64)])  # another job size: computed
    assert len(loads) == 2 and outputs.misses == 3
    small = OutputCache(max_bytes=first[0].nbytes)
    DetectorRun(load=load, outputs=small)("depth", weights, [frame(0), frame(1)])
    assert len(small.items) == 1  # the oldest went


def test_control_frames_run_through_the_detector_in_batches(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "movie"
    folder.mkdir()
    for i in range(5):
        write_png(folder / f"f{i}.png", frame(i))
    batches: list[int] = []
    run = DetectorRun(outputs=OutputCache(), batch=2)
    real = run._run

    def counting(detector, models, images):
        batches.append(len(images))
        return real(detector, models, images)

    run._run = counting
    done: list[int] = []
    run.progress = done.append
    spec = ControlNetSpec(
        "m",
        VideoInput(str(folder)),
        detector="depth",
        detector_models={"depth": str(tiny["depth"])},
    )
    frames = load_control_frames(spec, [0, 1, 2, 3, 4], 48, 32, run=run)
    assert batches == [2, 2, 1] and done == [2, 4, 5]
    assert all(frames[i].shape == (32, 48, 3) for i in range(5))


# --------------------------------------------------------------------------- weights


@pytest.fixture
def hub(tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The Hub stand-in serving the tiny models, each with a pickled decoy beside it."""
    repos = {}
    for name in ("person", "pose", "depth"):
        files = repo_files(tiny[name])
        files["pytorch_model.bin"] = b"not to be fetched"
        repos[f"tiny/{name}"] = files
    with FakeHub(repos) as server:
        use_in_process(server, monkeypatch.setattr, tmp_path / "hub-cache")
        yield server


def test_weights_download_with_progress_from_safetensors_only(
    hub: FakeHub, no_torch_load: list
) -> None:
    reports: list = []
    hooks = DownloadHooks(progress=reports.append)
    cache = ModelCache()
    weights = {"person": "tiny/person", "pose": "tiny/pose"}
    models = cache.detector("openpose", weights, CPU, hooks)
    assert cache.detector("openpose", weights, CPU, hooks) is models  # cached in the worker
    assert cache.loads == 1
    sent = hub.files_sent()
    assert "tiny/person:model.safetensors" in sent and "tiny/pose:model.safetensors" in sent
    assert not any(name.endswith(".bin") for name in sent)
    assert {r.model for r in reports} == {"tiny/person", "tiny/pose"}
    assert reports[-1].bytes_done == reports[-1].bytes_total > 0
    assert no_torch_load == []


def test_a_cancelled_download_stops_the_detector_load(hub: FakeHub, tmp_path: Path) -> None:
    from backend.models.hub import DownloadCancelled

    hooks = DownloadHooks(should_cancel=lambda: True)
    with pytest.raises(DownloadCancelled):
        load_detector("depth", {"depth": "tiny/depth"}, CPU, hooks)
    assert list((tmp_path / "hub-cache").rglob("model.safetensors")) == []  # no half weights


def test_offline_uses_the_cache_and_fails_fast_without_it(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    load_detector("depth", {"depth": "tiny/depth"}, CPU)  # online: now cached
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    asked = len(hub.requests)
    assert load_detector("depth", {"depth": "tiny/depth"}, CPU) is not None
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_detector("openpose", {"person": "tiny/person", "pose": "tiny/pose"}, CPU)
    assert time.monotonic() - started < 5.0
    message = str(info.value)
    assert "'person'" in message and "tiny/person" in message and "not downloaded" in message
    assert "online access is off" in message
    assert len(hub.requests) == asked  # offline: no request at all


def test_a_folder_without_safetensors_is_refused(tmp_path: Path, tiny: dict[str, Path]) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny["depth"] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match=r"'depth'.*no \.safetensors.*safetensors only"):
        load_detector("depth", {"depth": str(pickled)}, CPU)
    with pytest.raises(ModelLoadError, match="'pose'.*hub repo"):
        load_detector("openpose", {**local(tiny), "pose": "owner/repo/model.safetensors"}, CPU)


def test_a_config_asking_for_custom_code_is_refused(tmp_path: Path, tiny: dict[str, Path]) -> None:
    import shutil

    sneaky = tmp_path / "sneaky"
    shutil.copytree(tiny["depth"], sneaky)
    config = json.loads((sneaky / "config.json").read_text())
    config["auto_map"] = {"AutoModelForDepthEstimation": "evil.Model"}
    (sneaky / "config.json").write_text(json.dumps(config))
    (sneaky / "evil.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(ModelLoadError, match=r"'depth'.*config\.json asks for custom code"):
        load_detector("depth", {"depth": str(sneaky)}, CPU)


def test_default_weights_are_named_once_and_filled_in() -> None:
    assert weights_used("openpose", None) == DETECTOR_MODELS["openpose"]
    assert weights_used("openpose", {"pose": "me/pose"}) == {
        "person": DETECTOR_MODELS["openpose"]["person"],
        "pose": "me/pose",
    }
    assert weights_used("canny", None) is None and weights_used("none", None) is None


def test_job_json_records_the_detector_weights(
    tmp_path: Path, tiny: dict[str, Path], tiny_models: dict
) -> None:
    from backend.protocol import validate_job
    from backend.service.runner import JobEvents, run_job

    control = tmp_path / "control"
    control.mkdir()
    for i in range(2):
        write_png(control / f"c{i}.png", frame(i, 64, 64))
    weights = {"depth": str(tiny["depth"])}
    job = validate_job(
        {
            "prompt": "a cat",
            "out": str(tmp_path / "out"),
            "model": "builtin:tiny",
            "mode": "controlnet",
            "frames": 2,
            "width": 64,
            "height": 64,
            "steps": 2,
            "device": "cpu",
            "dtype": "float32",
            "write_mp4": False,
            "controlnets": [
                {
                    "model": "builtin:tiny-controlnet",
                    "control": str(control),
                    "detector": "depth",
                    "detector_models": weights,
                },
                {"model": "builtin:tiny-controlnet", "control": str(control), "detector": "canny"},
            ],
        }
    )
    stages: list[tuple] = []
    events = JobEvents(progress=lambda *a: stages.append((a[-1], a[0], a[1], a[3])))
    run_job(job, ModelCache(), events)
    assert [s for s in stages if s[0] == "detecting"] == [("detecting", 2, 2, 2)]
    saved = json.loads((tmp_path / "out" / "job.json").read_text())
    assert saved["controlnets"][0]["detector_models"] == weights
    assert "detector_models" not in saved["controlnets"][1]
    assert validate_job(saved).controlnets[0].detector_models == weights


def test_a_cancel_stops_detection_before_the_next_batch(
    tmp_path: Path, tiny: dict[str, Path], tiny_models: dict
) -> None:
    from backend.engine.pipeline import Cancelled
    from backend.protocol import validate_job
    from backend.service.runner import JobEvents, run_job

    batches: list[int] = []
    asked = iter([False, True])  # the second batch is cancelled
    run = DetectorRun(outputs=OutputCache(), batch=1, should_cancel=lambda: next(asked))
    run.progress = batches.append
    with pytest.raises(detectors.DetectionCancelled):
        run("depth", {"depth": str(tiny["depth"])}, [frame(0), frame(1), frame(2)])
    assert batches == [1]
    control = tmp_path / "control.png"
    write_png(control, frame(0, 64, 64))
    spec = {"model": "builtin:tiny-controlnet", "control": str(control), "detector": "depth"}
    job = validate_job(
        {
            "prompt": "a cat",
            "out": str(tmp_path / "out"),
            "model": "builtin:tiny",
            "mode": "controlnet",
            "frames": 2,
            "width": 64,
            "height": 64,
            "device": "cpu",
            "controlnets": [{**spec, "detector_models": {"depth": str(tiny["depth"])}}],
        }
    )
    with pytest.raises(Cancelled):
        run_job(job, ModelCache(), JobEvents(should_cancel=lambda: True))
    assert not (tmp_path / "out").exists()
