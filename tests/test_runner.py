"""backend/service/runner.py: a validated job end to end, in process (models cached across jobs)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import backend.service.runner as runner
from backend.engine.pipeline import Cancelled, ControlInput, TextToVideoZero
from backend.media.controls import load_control_frames
from backend.media.video_io import (
    OutputExistsError,
    VideoInputError,
    h264_available,
    read_frames,
    read_masks,
    write_png,
)
from backend.models.loading import ModelCache, choose_dtype
from backend.protocol import MAX_FRAMES, MAX_SIDE, MAX_STEPS, JobError, VideoInput, validate_job
from backend.service.runner import JobEvents, run_job


def make_job(out: Path, **fields: Any):
    data = {
        "prompt": "a cat",
        "out": str(out),
        "model": "builtin:tiny",
        "frames": 3,
        "width": 64,
        "height": 64,
        "steps": 3,
        "device": "cpu",
        "write_mp4": False,
        "save_latents": True,
        "dtype": "float32",  # the same on every CPU; "auto" is bf16 where bf16 is native
        **fields,
    }
    return validate_job(data)


@pytest.fixture(scope="module")
def cache(tiny_models: dict) -> ModelCache:
    """One cache for the module, as a worker would keep it."""
    return ModelCache(max_bases=2)


def latents(out: Path) -> np.ndarray:
    return np.load(out / "latents.npy")


def bar(path: Path, width: int) -> Path:
    """A control image: a white bar ``width`` pixels wide on black."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16 : 16 + width] = 255
    write_png(path, image)
    return path


def test_text2video_job_writes_a_reproducible_result(tmp_path: Path, cache: ModelCache) -> None:
    out = tmp_path / "run"
    events: list[tuple] = []
    previews: list[tuple[int, str, bool]] = []
    job = make_job(out, write_mp4=True, dtype="auto")
    result = run_job(
        job,
        cache,
        JobEvents(
            progress=lambda *a: events.append(a),
            preview=lambda f, p: previews.append((f, p, Path(p).is_file())),
        ),
    )
    assert result.out == str(out.resolve())
    assert result.frames == [str(out.resolve() / f"frame_0000{i}.png") for i in (1, 2, 3)]
    assert sorted(p.name for p in out.iterdir()) == [
        "frame_00001.png",
        "frame_00002.png",
        "frame_00003.png",
        "job.json",
        "latents.npy",
        "run.json",
        "video.mp4",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging left behind

    saved = json.loads((out / "job.json").read_text())
    again = validate_job(saved)
    assert again.out == str(out.resolve()) and again.motion == [12.0, 12.0]
    assert (again.t0, again.t1) == (job.t0, job.t1)
    lat = latents(out)
    assert lat.shape == (3, 4, 8, 8) and lat.dtype == np.float32
    info = json.loads((out / "run.json").read_text())
    auto = choose_dtype("auto", torch.device("cpu"))  # float32 here, bfloat16 with AMX
    assert info["device"] == "cpu" and info["dtype"] == auto.name
    assert info["dtype_reason"] == auto.reason and "bf16" in auto.reason
    if h264_available():  # frames streamed into the movie as they were decoded
        import av

        with av.open(str(out / "video.mp4")) as movie:
            assert movie.streams.video[0].codec_context.name == "h264"
            assert sum(1 for _ in movie.decode(video=0)) == 3

    assert [(f, ok) for f, _, ok in previews] == [(0, True), (1, True), (2, True)]
    fractions = [e[4] for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    stages = [e[5] for e in events]
    assert stages[0] == "denoising" and stages[-1] == "decoding"
    assert events[-1][2:4] == (3, 3)  # frames written / total


@pytest.mark.parametrize("frames", [1, runner.DECODE_SLICE + 1])
def test_every_frame_is_written_and_is_its_decoded_latent(
    tmp_path: Path, cache: ModelCache, frames: int
) -> None:
    """One PNG per frame, in order, each the decode of that frame's latents: a lone frame
    and a last decode slice holding a single frame included."""
    import cv2
    import torch

    from backend.engine.pipeline import TextToVideoZero
    from backend.models.loading import load_base_model

    out = tmp_path / "run"
    result = run_job(make_job(out, frames=frames), cache)
    names = [f"frame_{i:05d}.png" for i in range(1, frames + 1)]
    assert [Path(p).name for p in result.frames] == names
    assert sorted(p.name for p in out.glob("frame_*.png")) == names
    decoded = TextToVideoZero(load_base_model("builtin:tiny")).decode(
        torch.from_numpy(latents(out))
    )
    for name, expected in zip(names, decoded.numpy(), strict=True):
        png = cv2.cvtColor(cv2.imread(str(out / name)), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(png, expected)


def test_denoising_previews_show_frame_1_forming_and_leave_no_files(
    tmp_path: Path, cache: ModelCache
) -> None:
    out = tmp_path / "run"
    seen: list[tuple[int, str, bool]] = []
    job = make_job(out, steps=4)
    run_job(
        job,
        cache,
        JobEvents(
            preview=lambda f, p: seen.append((f, p, Path(p).is_file())),
            preview_every=0.0,  # as often as the 1/20-of-the-time budget allows
        ),
    )
    denoising = [(f, p, ok) for f, p, ok in seen if Path(p).name.startswith(".preview-")]
    assert denoising, "no preview while denoising"
    assert all(f == 0 and ok for f, _, ok in denoising)
    assert seen.index(denoising[-1]) < len(seen) - 3  # before the 3 finished frames
    assert not list(out.glob(".preview-*"))  # none of them lands in the result


def test_second_job_reuses_the_loaded_models(tmp_path: Path, tiny_models: dict) -> None:
    cache = ModelCache()
    run_job(make_job(tmp_path / "a", frames=2), cache)
    assert cache.loads == 1
    run_job(make_job(tmp_path / "b", frames=2, seed=3), cache)
    assert cache.loads == 1


def test_frame_range_and_chunks_match_the_full_run(tmp_path: Path, cache: ModelCache) -> None:
    run_job(make_job(tmp_path / "full", frames=4), cache)
    run_job(make_job(tmp_path / "part", frames=4, frame_range=[2, 3], chunk_size=1), cache)
    assert sorted(p.name for p in (tmp_path / "part").glob("*.png")) == [
        "frame_00002.png",
        "frame_00003.png",
    ]
    np.testing.assert_allclose(
        latents(tmp_path / "part"), latents(tmp_path / "full")[1:3], rtol=1e-5, atol=1e-4
    )


def test_text2video_motion_moves_frames_2_to_m(tmp_path: Path, cache: ModelCache) -> None:
    run_job(make_job(tmp_path / "still", motion=[0, 0]), cache)
    run_job(make_job(tmp_path / "pan", motion=[64, 0]), cache)
    still, pan = latents(tmp_path / "still"), latents(tmp_path / "pan")
    np.testing.assert_allclose(pan[0], still[0], rtol=1e-5, atol=1e-4)  # the anchor
    assert np.abs(pan[1:] - still[1:]).max() > 1e-2
    # Motion dynamics give every frame its own start, so frames differ even without motion.
    assert np.abs(still[1] - still[0]).max() > 1e-2


def test_existing_output_is_refused_and_untouched(tmp_path: Path, cache: ModelCache) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="already exists"):
        run_job(make_job(out), cache)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_cancel_leaves_nothing(tmp_path: Path, cache: ModelCache) -> None:
    polls = []

    def should_cancel() -> bool:
        polls.append(1)
        return len(polls) > 2

    with pytest.raises(Cancelled):
        run_job(make_job(tmp_path / "out"), cache, JobEvents(should_cancel=should_cancel))
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_leaves_nothing(
    tmp_path: Path, cache: ModelCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = runner.write_png
    written = []

    def flaky_write(path: Path, image: np.ndarray) -> None:
        if written:
            raise OSError("disk full")
        real_write(path, image)
        written.append(path)

    monkeypatch.setattr(runner, "write_png", flaky_write)
    with pytest.raises(OSError, match="disk full"):
        run_job(make_job(tmp_path / "out"), cache)
    assert written and not written[0].exists()
    assert list(tmp_path.iterdir()) == []


def test_controlnet_job_with_one_still_control(tmp_path: Path, cache: ModelCache) -> None:
    control = bar(tmp_path / "control.png", 20)
    job = make_job(
        tmp_path / "out",
        mode="controlnet",
        frames=3,
        controlnets=[{"model": "builtin:tiny-controlnet", "control": str(control)}],
    )
    run_job(job, cache)
    lat = latents(tmp_path / "out")
    for k in (1, 2):
        np.testing.assert_allclose(lat[k], lat[0], rtol=1e-5, atol=1e-4)
    saved = validate_job(json.loads((tmp_path / "out" / "job.json").read_text()))
    assert saved.motion == [0.0, 0.0] and saved.t0 is None


def test_controlnet_job_follows_a_control_video(tmp_path: Path, cache: ModelCache) -> None:
    folder = tmp_path / "control"
    for i in range(3):
        bar(folder / f"c{i}.png", 10 + 10 * i)
    job = make_job(
        tmp_path / "out",
        mode="controlnet",
        controlnets=[
            {"model": "builtin:tiny-controlnet", "control": str(folder), "detector": "canny"},
            {"model": "builtin:tiny-controlnet", "control": str(folder), "weight": 0.5},
        ],
    )
    run_job(job, cache)
    lat = latents(tmp_path / "out")
    assert np.abs(lat[1] - lat[0]).max() > 1e-2 and np.abs(lat[2] - lat[1]).max() > 1e-2


def test_pix2pix_job(tmp_path: Path, cache: ModelCache) -> None:
    video = tmp_path / "video"
    video.mkdir()
    for i in range(3):
        image = np.full((48, 80, 3), 40 * i, np.uint8)
        write_png(video / f"v{i}.png", image)
    job = make_job(tmp_path / "out", mode="pix2pix", model="builtin:tiny-pix2pix", video=str(video))
    result = run_job(job, cache)
    assert len(result.frames) == 3
    assert latents(tmp_path / "out").shape == (3, 4, 8, 8)
    saved = validate_job(json.loads((tmp_path / "out" / "job.json").read_text()))
    assert saved.mode == "pix2pix" and saved.motion is None


def test_smoothing_with_mask_video(tmp_path: Path, cache: ModelCache) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    write_png(masks / "m.png", np.full((64, 64, 3), 255, np.uint8))  # all foreground
    run_job(make_job(tmp_path / "plain", frames=2), cache)
    masked = make_job(tmp_path / "masked", frames=2, smooth_bg=True, masks=str(masks / "m.png"))
    run_job(masked, cache)
    np.testing.assert_allclose(
        latents(tmp_path / "masked"), latents(tmp_path / "plain"), rtol=1e-5, atol=1e-4
    )
    # All background: frame 2 is blended toward frame 1; frame 1, the anchor, never is.
    write_png(masks / "bg.png", np.zeros((64, 64, 3), np.uint8))
    blended = make_job(tmp_path / "blended", frames=2, smooth_bg=True, masks=str(masks / "bg.png"))
    run_job(blended, cache)
    plain, smoothed = latents(tmp_path / "plain"), latents(tmp_path / "blended")
    np.testing.assert_allclose(smoothed[0], plain[0], rtol=1e-5, atol=1e-4)
    assert np.abs(smoothed[1] - plain[1]).max() > 1e-2


def test_bad_inputs_fail_before_any_output(tmp_path: Path, cache: ModelCache) -> None:
    job = make_job(
        tmp_path / "out",
        mode="controlnet",
        controlnets=[{"model": "builtin:tiny-controlnet", "control": str(tmp_path / "none")}],
    )
    with pytest.raises(ValueError, match="does not exist"):
        run_job(job, cache)
    assert list(tmp_path.iterdir()) == []


def test_a_jobs_allow_pickle_field_alone_never_loads_pickled_weights(
    tmp_path: Path, cache: ModelCache, pickled_controlnet: Path
) -> None:
    """allow_pickle: true inside someone else's job.json used to turn pickle loading on."""
    from backend.models.loading import ModelLoadError

    control = str(bar(tmp_path / "control.png", 20))
    fields = {
        "mode": "controlnet",
        "frames": 1,
        "steps": 2,
        "allow_pickle": True,
        "controlnets": [{"model": str(pickled_controlnet), "control": control}],
    }
    with pytest.raises(ModelLoadError, match="pickled.*--allow-pickle"):
        run_job(make_job(tmp_path / "asked", **fields), cache)
    assert not (tmp_path / "asked").exists()
    run_job(make_job(tmp_path / "allowed", **fields), cache, allow_pickle=True)
    saved = json.loads((tmp_path / "allowed" / "job.json").read_text())
    assert saved["allow_pickle"] is True
    run_job(make_job(tmp_path / "plain", frames=1, steps=2, allow_pickle=True), cache)
    assert json.loads((tmp_path / "plain" / "job.json").read_text())["allow_pickle"] is False


def _full_disk_for_pngs(monkeypatch: pytest.MonkeyPatch) -> None:
    """PNG files written by the backend land on /dev/full: the kernel answers ENOSPC."""
    import builtins

    import backend.media.video_io as video_io

    def open_full(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith(".png") and "w" in mode:
            return builtins.open("/dev/full", mode, *args, **kwargs)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(video_io, "open", open_full, raising=False)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_names_the_cause_and_the_path(
    tmp_path: Path, cache: ModelCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cv2.imwrite said only "cannot write" (or nothing at all); now: No space left, where."""
    _full_disk_for_pngs(monkeypatch)
    with pytest.raises(OSError) as info:
        run_job(make_job(tmp_path / "out", frames=1, steps=2), cache)
    text = str(info.value)
    assert "No space left on device" in text and "frame_00001.png" in text
    assert str(tmp_path) in text
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_folders_are_swept_before_writing(tmp_path: Path, cache: ModelCache) -> None:
    """A job writing into a folder removes partial results of killed processes there."""
    import subprocess
    import sys

    from backend.protocol import partial_name

    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = tmp_path / partial_name("killed", pid=int(done.stdout))
    running = tmp_path / partial_name("running", pid=os.getppid())
    for folder in (stale, running):
        folder.mkdir()
        (folder / "frame_00001.png").write_bytes(b"half")
    run_job(make_job(tmp_path / "out", frames=1, steps=2), cache)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, "out"])


class NoLoads(ModelCache):
    """A model cache that fails the test when a model is asked for."""

    def base(self, name: str, **kwargs: Any) -> Any:
        raise AssertionError(f"model {name} was loaded before the inputs were checked")

    def controlnet(self, name: str, **kwargs: Any) -> Any:
        raise AssertionError(f"ControlNet {name} was loaded before the inputs were checked")


@pytest.mark.parametrize(
    ("case", "error", "text"),
    [
        ("control", ValueError, "does not exist"),
        ("short control", ValueError, "1 images"),
        ("video", ValueError, "does not exist"),
        ("masks", ValueError, "does not exist"),
        ("out under a file", OSError, "Not a directory"),
        ("out read-only", OSError, "cannot write the result"),
    ],
)
def test_missing_inputs_and_unwritable_output_fail_before_any_model_loads(
    tmp_path: Path, case: str, error: type, text: str
) -> None:
    """These failed 6 to 8 s later on the tiny models (minutes with real ones)."""
    still = str(bar(tmp_path / "in" / "still.png", 20))
    short = bar(tmp_path / "in" / "short" / "c0.png", 20).parent
    missing = str(tmp_path / "in" / "missing")
    out = tmp_path / "out"
    fields: dict[str, Any] = {
        "control": {"mode": "controlnet", "controlnets": [{**CN, "control": missing}]},
        "short control": {"mode": "controlnet", "controlnets": [{**CN, "control": str(short)}]},
        "video": {**P2P, "video": missing},
        "masks": {"smooth_bg": True, "masks": missing},
        "out under a file": {"controlnets": []},
        "out read-only": {},
    }[case]
    if case == "out under a file":
        out = Path(still) / "out"
    elif case == "out read-only":
        if os.geteuid() != 0:
            (tmp_path / "locked").mkdir(mode=0o500)
            out = tmp_path / "locked" / "new" / "out"
        elif Path("/sys/kernel").is_dir():
            out = Path("/sys/kernel/t2vz-test/out")  # read-only even for root
        else:
            pytest.skip("no folder that is read-only for this user")
    job = make_job(out, **_with_still(fields, still))
    with pytest.raises(error, match=text):
        run_job(job, NoLoads())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# --------------------------------------------------------------------------- boundaries

STILL = "STILL"  # replaced by a still image path in the test
CN = {"model": "builtin:tiny-controlnet", "control": STILL}
P2P = {"mode": "pix2pix", "model": "builtin:tiny-pix2pix", "video": STILL}
# Every numeric job field at the minimum and the maximum validate_job accepts (the sizes
# one at a time, the frame count through a frame range so that a run stays small).
BOUNDARIES = {
    "frames min": {"frames": 1},
    "frames max": {"frames": MAX_FRAMES, "frame_range": [MAX_FRAMES, MAX_FRAMES]},
    "width min, height max": {"width": 64, "height": MAX_SIDE, "frames": 1},
    "width max, height min": {"width": MAX_SIDE, "height": 64, "frames": 1},
    "steps min (text2video)": {"steps": 2},
    "steps min (controlnet)": {"mode": "controlnet", "steps": 1, "controlnets": [CN]},
    "steps max": {"steps": MAX_STEPS, "frames": 1, "guidance": 0.0},
    "guidance min": {"guidance": 0.0},
    "guidance max": {"guidance": 100.0},
    "seed min": {"seed": 0},
    "seed max": {"seed": 2**63 - 1},
    "chunk_size min": {"chunk_size": 1, "frames": 3},
    "chunk_size max": {"chunk_size": MAX_FRAMES},
    "frame_range min": {"frame_range": [1, 1]},
    "frame_range max": {"frame_range": [2, 2]},
    "motion min": {"motion": [-512.0, -512.0]},
    "motion max": {"motion": [512.0, 512.0]},
    "t0, t1 min": {"steps": 4, "t0": 0, "t1": 1},
    "t0, t1 max": {"steps": 4, "t0": 2, "t1": 3},
    "smooth_alpha min": {"smooth_bg": True, "smooth_alpha": 0.0},
    "smooth_alpha max": {"smooth_bg": True, "smooth_alpha": 1.0},
    "fps min": {"fps": 0.1, "write_mp4": True},
    "fps max": {"fps": 1000.0, "write_mp4": True},
    "image_guidance min": {**P2P, "image_guidance": 0.0},
    "image_guidance max": {**P2P, "image_guidance": 100.0},
    "video start, stride min": {**P2P, "video": {"path": STILL, "start": 0, "stride": 1e-3}},
    "video start, stride large": {
        **P2P,
        "video": {"path": STILL, "start": 10**12, "stride": 1000.0},
    },
    "controlnet weight min": {"mode": "controlnet", "controlnets": [{**CN, "weight": 0.0}]},
    "controlnet weight max": {"mode": "controlnet", "controlnets": [{**CN, "weight": 10.0}]},
    "masks stride max": {
        "smooth_bg": True,
        "masks": {"path": STILL, "start": 10**12, "stride": 1000.0},
    },
}
# Just beyond each bound: refused by validation, naming the field.
BEYOND = {
    "frames": {"frames": 0},
    "frames ": {"frames": MAX_FRAMES + 1},
    "width": {"width": MAX_SIDE + 8},
    "height": {"height": 56},
    "steps": {"steps": MAX_STEPS + 1},
    "steps ": {"steps": 1},
    "guidance": {"guidance": 100.5},
    "seed": {"seed": 2**63},
    "chunk_size": {"chunk_size": 0},
    "chunk_size ": {"chunk_size": MAX_FRAMES + 1},
    "motion[0]": {"motion": [-513.0, 0.0]},
    "t1": {"steps": 4, "t0": 2, "t1": 4},
    "smooth_alpha": {"smooth_bg": True, "smooth_alpha": 1.01},
    "fps": {"fps": 0.09},
    "fps ": {"fps": 1001.0},
    "image_guidance": {**P2P, "image_guidance": 101.0},
    "video.stride": {**P2P, "video": {"path": STILL, "stride": 1001.0}},
    "controlnets[0].weight": {"mode": "controlnet", "controlnets": [{**CN, "weight": 10.5}]},
}


def _with_still(fields: Any, still: str) -> Any:
    """``fields`` with every STILL placeholder replaced by the still image path."""
    if fields == STILL:
        return still
    if isinstance(fields, dict):
        return {k: _with_still(v, still) for k, v in fields.items()}
    if isinstance(fields, list):
        return [_with_still(v, still) for v in fields]
    return fields


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c == "steps max" else c for c in BOUNDARIES]
)
def test_every_accepted_boundary_value_runs(tmp_path: Path, cache: ModelCache, case: str) -> None:
    """The validator's minimum and maximum of every numeric field run (``--steps 1000``
    used to pass validation and crash every mode with an IndexError)."""
    fields = {"frames": 2, "steps": 2, "save_latents": False, **BOUNDARIES[case]}
    job = make_job(tmp_path / "out", **_with_still(fields, str(bar(tmp_path / "still.png", 20))))
    result = run_job(job, cache)
    assert len(result.frames) == len(job.frame_indices)
    assert all(Path(p).is_file() for p in result.frames)


@pytest.mark.parametrize("field", list(BEYOND))
def test_values_beyond_the_boundaries_are_refused_by_validation(field: str) -> None:
    with pytest.raises(JobError) as info:
        make_job(Path("/tmp/out"), **_with_still(BEYOND[field], "/tmp/still.png"))
    assert info.value.field == field.strip()


def test_a_step_count_beyond_the_models_schedule_is_a_clear_error(tiny_base: Any) -> None:
    """With steps_offset 1, as many steps as the schedule has timesteps asks for one past
    its end: a ValueError naming the count, not an IndexError deep in the scheduler."""
    import dataclasses

    from backend.engine.pipeline import TextToVideoZero

    config = {**tiny_base.scheduler_config, "num_train_timesteps": 20, "steps_offset": 1}
    engine = TextToVideoZero(dataclasses.replace(tiny_base, scheduler_config=config))
    small = {"prompt": "x", "num_frames": 1, "height": 64, "width": 64, "guidance_scale": 0.0}
    small["motion_dynamics"] = False
    assert engine(num_inference_steps=19, **small).shape[0] == 1
    with pytest.raises(ValueError, match="num_inference_steps must be at most 19.*got 20"):
        engine(num_inference_steps=20, **small)


def moving_video(folder: Path, frames: int) -> Path:
    """PNG frames of a white square moving right on grey, 80x48 (fitted to 64x64 on read)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(frames):
        image = np.full((48, 80, 3), 60, np.uint8)
        image[10:34, 8 + 8 * i : 32 + 8 * i] = 255
        write_png(folder / f"v{i:02d}.png", image)
    return folder


@pytest.mark.parametrize("mode", ["controlnet", "pix2pix"])
def test_streamed_inputs_give_the_in_memory_result_at_any_chunk_size(
    tmp_path: Path,
    cache: ModelCache,
    tiny_base: Any,
    tiny_pix2pix: Any,
    tiny_controlnet: Any,
    mode: str,
) -> None:
    """Control / source frames and masks read back per chunk from their spool files give the
    latents of the engine run on every frame held in memory, chunked or not."""
    video = moving_video(tmp_path / "video", 5)
    source = {"path": str(video), "stride": 0.5}  # frames 0/1 and 2/3 share a source frame
    fields: dict[str, Any] = {"frames": 5}
    smooth = mode == "controlnet"  # masks (background smoothing) are not for pix2pix
    if smooth:
        fields["controlnets"] = [
            {"model": "builtin:tiny-controlnet", "control": source, "detector": "canny"}
        ]
        fields.update(smooth_bg=True, masks=source)
    else:
        fields.update(model="builtin:tiny-pix2pix", video=source)
    jobs = {c: make_job(tmp_path / f"c{c}", mode=mode, chunk_size=c, **fields) for c in (2, 5)}
    for job in jobs.values():
        run_job(job, cache)
    streamed = {c: latents(tmp_path / f"c{c}") for c in jobs}
    np.testing.assert_allclose(streamed[2], streamed[5], rtol=1e-5, atol=1e-4)

    job = jobs[5]
    frames = list(range(5))
    to_tensor = lambda img: torch.from_numpy(img).permute(2, 0, 1)  # noqa: E731
    masks = None
    if smooth:
        held_masks = read_masks(job.masks, frames, 64, 64)
        masks = {f: torch.from_numpy(m)[None] for f, m in held_masks.items()}
    controls, image, base = [], None, tiny_base
    if mode == "controlnet":
        held = load_control_frames(job.controlnets[0], frames, 64, 64)
        controls = [ControlInput(tiny_controlnet, {f: to_tensor(i) for f, i in held.items()})]
    else:
        image = {f: to_tensor(i) for f, i in read_frames(job.video, frames, 64, 64).items()}
        base = tiny_pix2pix
    engine = TextToVideoZero(base, [tiny_controlnet] if controls else [])
    held_latents = engine(
        prompt=job.prompt,
        num_frames=5,
        height=64,
        width=64,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance,
        seed=job.seed,
        chunk_size=5,
        motion=tuple(job.effective_motion),
        motion_dynamics=False,
        smooth_bg=smooth,
        masks=masks,
        controls=controls,
        image=image,
        image_guidance_scale=job.image_guidance,
    )
    np.testing.assert_allclose(streamed[5], held_latents.numpy(), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- size and fit


def run_sized(tmp_path: Path, cache: ModelCache, name: str, **fields: Any) -> dict[str, Any]:
    """Run a 2-frame tiny pix2pix job on a 160x90 (16:9) source without width/height unless
    given; return the (width, height, fit) the source was read at and the job.json."""
    source = tmp_path / "wide.png"
    if not source.exists():
        wide = np.full((90, 160, 3), 128, np.uint8)
        wide[:, :16] = (255, 0, 0)
        write_png(source, wide)
    data = make_job(
        tmp_path / name, frames=2, mode="pix2pix", model="builtin:tiny-pix2pix", video=str(source)
    ).to_dict()
    data.pop("width"), data.pop("height")
    data.update(fields)
    seen: dict[str, Any] = {}
    real = runner.store_frames

    def spy(spec, frame_ids, width, height, fit="crop"):
        seen.update(size=(width, height), fit=fit)
        return real(spec, frame_ids, width, height, fit)

    runner.store_frames = spy
    try:
        run_job(validate_job(data), cache)
    finally:
        runner.store_frames = real
    written = json.loads((tmp_path / name / "job.json").read_text())
    assert (written["width"], written["height"], written["fit"]) == (*seen["size"], seen["fit"])
    assert latents(tmp_path / name).shape[2:] == (seen["size"][1] // 8, seen["size"][0] // 8)
    return written


@pytest.mark.parametrize("fit", ["crop", "pad", "stretch"])
def test_a_job_with_one_side_takes_the_other_from_the_input_aspect(
    tmp_path: Path, cache: ModelCache, fit: str
) -> None:
    written = run_sized(tmp_path, cache, "out", width=128, fit=fit)
    assert (written["width"], written["height"], written["fit"]) == (128, 72, fit)  # 16:9
    frame = read_frames(VideoInput(str(tmp_path / "out" / "frame_00001.png")), [0], 128, 72)[0]
    assert frame.shape == (72, 128, 3)
    assert (validate_job(written).width, validate_job(written).height) == (128, 72)  # rerun


def test_a_job_without_size_is_native_pixel_count_at_the_input_aspect(
    tmp_path: Path, cache: ModelCache
) -> None:
    """tiny-pix2pix is trained at 64x64 (sample_size 8 x VAE factor 8): 16:9 at 64*64 pixels
    is 88x48, and the schema's smallest side (64) lifts the height: 88x64."""
    written = run_sized(tmp_path, cache, "auto")
    assert (written["width"], written["height"], written["fit"]) == (88, 64, "crop")


def test_text2video_without_size_is_the_native_square(tmp_path: Path, cache: ModelCache) -> None:
    data = make_job(tmp_path / "t2v", frames=1).to_dict()
    data.pop("width"), data.pop("height")
    run_job(validate_job(data), cache)
    written = json.loads((tmp_path / "t2v" / "job.json").read_text())
    assert (written["width"], written["height"]) == (64, 64)


# --------------------------------------------------------------------------- mutation survivors
# Behaviour the mutation run (docs/mutation.md) found unchecked.


def test_denoising_previews_keep_the_last_two_files(tmp_path: Path) -> None:
    """The add-on may still be reading the previous preview: the newest two stay on disk,
    older ones go, and remove_files leaves none."""

    class Engine:
        def decode(self, latent: torch.Tensor) -> torch.Tensor:
            return torch.zeros(1, 8, 8, 3, dtype=torch.uint8)

    announced: list[str] = []
    preview = runner.DenoisingPreview(
        Engine(), tmp_path, JobEvents(preview=lambda f, p: announced.append(p))
    )
    for step in range(1, 6):
        preview.due = 0.0  # due now (the real pacing waits 20x the decode time)
        preview(step, torch.zeros(1, 4, 1, 1))
        on_disk = sorted(p.name for p in tmp_path.glob(".preview-*"))
        newest = [f".preview-{s:04d}.png" for s in range(max(1, step - 1), step + 1)]
        assert on_disk == newest, step
        assert Path(announced[-1]).name == newest[-1]
    preview.remove_files()
    assert not list(tmp_path.glob(".preview-*"))


def test_a_controlnet_job_without_size_takes_the_control_videos_aspect(
    tmp_path: Path, cache: ModelCache
) -> None:
    """No source video: the size comes from the first ControlNet's control (16:9 here), at
    the tiny model's native 64x64 pixel count: 88x48, lifted to the schema's smallest side
    64 (as for the pix2pix source above)."""
    wide = np.zeros((90, 160, 3), np.uint8)
    wide[20:70, 40:120] = 255
    write_png(tmp_path / "wide.png", wide)
    data = make_job(
        tmp_path / "out",
        mode="controlnet",
        frames=2,
        controlnets=[{"model": "builtin:tiny-controlnet", "control": str(tmp_path / "wide.png")}],
    ).to_dict()
    data.pop("width"), data.pop("height")
    run_job(validate_job(data), cache)
    written = json.loads((tmp_path / "out" / "job.json").read_text())
    assert (written["width"], written["height"]) == (88, 64)


def test_a_partial_controlnet_job_reads_frame_1_and_equals_the_full_run(
    tmp_path: Path, cache: ModelCache
) -> None:
    """Frames 3-4 of a ControlNet video still need frame 1's control (the anchor every frame
    attends to), and come out as the full run's frames 3-4."""
    folder = tmp_path / "control"
    for i in range(4):
        bar(folder / f"c{i}.png", 8 + 8 * i)
    spec = [{"model": "builtin:tiny-controlnet", "control": str(folder)}]
    run_job(make_job(tmp_path / "full", mode="controlnet", frames=4, controlnets=spec), cache)
    part = make_job(
        tmp_path / "part", mode="controlnet", frames=4, frame_range=[3, 4], controlnets=spec
    )
    run_job(part, cache)
    np.testing.assert_allclose(
        latents(tmp_path / "part"), latents(tmp_path / "full")[2:4], rtol=1e-5, atol=1e-4
    )


def test_a_bfloat16_controlnet_job_loads_its_controlnet_in_bfloat16(
    tmp_path: Path, cache: ModelCache
) -> None:
    """The ControlNet takes the job's dtype like the base (bf16 residuals added to a bf16
    UNet); the result is the fp32 run's within bf16's precision."""
    control = bar(tmp_path / "control.png", 20)
    spec = [{"model": "builtin:tiny-controlnet", "control": str(control)}]
    for dtype in ("float32", "bfloat16"):
        job = make_job(tmp_path / dtype, mode="controlnet", frames=2, controlnets=spec, dtype=dtype)
        run_job(job, cache)
    loaded = [m for key, m in cache._controlnets.items() if "bfloat16" in str(key)]
    assert loaded and all(p.dtype == torch.bfloat16 for m in loaded for p in m.parameters())
    a, b = latents(tmp_path / "float32"), latents(tmp_path / "bfloat16")
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


def test_run_json_records_the_jobs_own_run_time(tmp_path: Path, cache: ModelCache) -> None:
    """run.json's seconds: the job's wall time, within the time the call took (not a clock
    reading)."""
    started = time.perf_counter()
    run_job(make_job(tmp_path / "out", frames=1), cache)
    wall = time.perf_counter() - started
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert 0 < info["seconds"] <= wall + 0.001


# --------------------------------------------------------------------------- from mutants


class Clock:
    """A stand-in for time.perf_counter that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_denoising_previews_wait_for_preview_every_and_their_own_cost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first preview comes once ``preview_every`` seconds have passed; after one, the
    next waits ``max(preview_every, 20 x what the preview cost)``, so previews never take
    more than 1/20 of the time (JobEvents' contract)."""
    clock = Clock()
    monkeypatch.setattr(runner.time, "perf_counter", clock)
    decodes: list[float] = []

    class Engine:
        cost = 1.0  # seconds one preview decode takes

        def decode(self, latent: torch.Tensor) -> torch.Tensor:
            decodes.append(clock.now)
            clock.now += self.cost
            return torch.zeros(1, 8, 8, 3, dtype=torch.uint8)

    shown: list[int] = []
    events = JobEvents(preview=lambda f, p: shown.append(f), preview_every=10.0)
    preview = runner.DenoisingPreview(Engine(), tmp_path, events)  # at 1000: due 1010
    latent = torch.zeros(1, 4, 1, 1)
    for at, step in ((1005.0, 1), (1010.0, 2), (1030.0, 3), (1031.0, 4)):
        clock.now = at
        preview(step, latent)
    # Not at 1005 (before due); at 1010 exactly (due); the decode ended at 1011 and cost
    # 1 s, so the next is due at 1011 + max(10, 20 x 1) = 1031: not at 1030, at 1031.
    assert decodes == [1010.0, 1031.0] and shown == [0, 0]

    # Without preview_every: the first at once, then only the cost rule (20 x 0.01 s).
    Engine.cost = 0.01
    decodes.clear()
    clock.now = 2000.0
    preview = runner.DenoisingPreview(Engine(), tmp_path, JobEvents(preview=lambda f, p: None))
    for at in (2000.0, 2000.1, 2000.21, 2000.3):
        clock.now = at
        preview(1, latent)
    assert decodes == [2000.0, 2000.21]
    # No preview hook: nothing is decoded whatever the time.
    decodes.clear()
    runner.DenoisingPreview(Engine(), tmp_path, JobEvents(preview_every=0.0))(1, latent)
    assert decodes == []


def test_masks_are_white_foreground_scaled_to_one() -> None:
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 0] = 255
    image[1, 2] = (64, 128, 192)  # a soft edge: the channels' mean, 128 / 255
    mask = runner._mask_tensor(image)
    assert mask.shape == (1, 2, 3) and mask.dtype == torch.float32
    assert mask[0, 0, 0] == 1.0 and mask[0, 0, 1] == 0.0
    assert mask[0, 1, 2].item() == pytest.approx(128 / 255, abs=1e-7)


def test_native_side_is_the_trained_pixel_count_as_a_square() -> None:
    from types import SimpleNamespace

    def base(sample: Any) -> Any:
        return SimpleNamespace(
            unet=SimpleNamespace(config=SimpleNamespace(sample_size=sample)), vae_scale_factor=8
        )

    assert runner.native_side(base(64)) == 512  # SD 1.x
    assert runner.native_side(base([64, 64])) == 512
    assert runner.native_side(base((48, 75))) == 480  # 384 x 600 pixels: the area of 480^2


def test_keypoint_controls_have_no_aspect_whatever_their_extension_case(tmp_path: Path) -> None:
    """OpenPose keypoint files (.json, any case) are square unless sized: never opened as a
    picture (none of these exists)."""
    from types import SimpleNamespace

    for name in ("pose.json", "POSE.JSON", "Pose.Json"):
        control = VideoInput(str(tmp_path / name))
        job = SimpleNamespace(video=None, controlnets=[SimpleNamespace(control=control)])
        assert runner.input_aspect(job) == 1.0
    missing = SimpleNamespace(video=VideoInput(str(tmp_path / "gone.png")), controlnets=[])
    with pytest.raises(VideoInputError, match="gone.png does not exist"):
        runner.input_aspect(missing)


def test_job_size_keeps_a_given_size_and_logs_the_one_it_chooses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="backend.service.runner"):
        assert runner.job_size(make_job(tmp_path / "a", width=96, height=64), 64, 2.0) == (96, 64)
        assert caplog.records == []  # a sized job: nothing chosen, nothing said
        one_side = make_job(tmp_path / "b", width=None, height=64, fit="pad")
        assert runner.job_size(one_side, 64, 1.5) == (96, 64)  # the other side from the aspect
        unsized = make_job(tmp_path / "c", width=None, height=None)
        assert runner.job_size(unsized, 64, 1.0) == (64, 64)
    assert [r.getMessage() for r in caplog.records] == [
        "size 96x64 (pad fit of the input; native side 64)",
        "size 64x64 (crop fit of the input; native side 64)",
    ]


def test_warnings_for_tiny_models_and_an_ignored_allow_pickle(
    tmp_path: Path, cache: ModelCache, caplog: pytest.LogCaptureFixture
) -> None:
    """The smoke-test warning is for builtin:tiny* only (not the trained shapes models, not
    a folder); the allow_pickle warning only when the job asks and the caller does not."""

    def warnings(**fields: Any) -> list[str]:
        caplog.clear()
        allowed = fields.pop("allowed", False)
        with caplog.at_level("WARNING", logger="backend.service.runner"):
            name = f"w{len(list(tmp_path.iterdir()))}"
            run_job(
                make_job(tmp_path / name, frames=1, steps=2, **fields), cache, allow_pickle=allowed
            )
        return [r.getMessage() for r in caplog.records]

    assert warnings() == ["builtin:tiny is a tiny random-weight smoke-test model: expect noise"]
    assert warnings(model="builtin:shapes") == []
    asked = warnings(model="builtin:shapes", allow_pickle=True)
    assert asked == [
        "the job asks for allow_pickle; ignored: only --allow-pickle (or the add-on "
        "preference) lets pickled weights load"
    ]
    assert warnings(model="builtin:shapes", allow_pickle=True, allowed=True) == []
    assert warnings(model="builtin:shapes", allowed=True) == []


def _wide(path: Path, left_columns: int) -> Path:
    """A 96x64 picture, white in its ``left_columns`` leftmost columns: a crop to a square
    cuts them off, a pad keeps them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.zeros((64, 96, 3), np.uint8)
    image[:, :left_columns] = 255
    write_png(path, image)
    return path


def test_control_videos_and_masks_follow_the_jobs_fit(tmp_path: Path, cache: ModelCache) -> None:
    """The job's fit reaches the control frames and the masks (not only the source video):
    with an input of another aspect, pad and crop give different results."""
    control = str(_wide(tmp_path / "control.png", 12))
    controlnet = {"mode": "controlnet", "frames": 2, "steps": 2}
    spec = {"controlnets": [{"model": "builtin:tiny-controlnet", "control": control}]}
    for fit in ("crop", "pad"):
        run_job(make_job(tmp_path / f"cn-{fit}", fit=fit, **controlnet, **spec), cache)
    assert np.abs(latents(tmp_path / "cn-pad") - latents(tmp_path / "cn-crop")).max() > 1e-3

    mask = str(_wide(tmp_path / "mask.png", 12))
    for fit in ("crop", "pad"):
        job = make_job(tmp_path / f"m-{fit}", frames=2, fit=fit, smooth_bg=True, masks=mask)
        run_job(job, cache)
    assert np.abs(latents(tmp_path / "m-pad") - latents(tmp_path / "m-crop")).max() > 1e-3


def test_a_hub_base_model_downloads_with_the_jobs_hooks(
    tmp_path: Path, tiny_models: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_job hands the job's download and cancel hooks to model loading: a hub model
    reports its download, then runs as the same model from its folder; a cancel during the
    download ends the job as cancelled, with no output."""
    from fakehub import FakeHub, use_in_process

    folder = tiny_models["tiny"]
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with FakeHub({"test/tiny": files}) as hub:
        use_in_process(hub, monkeypatch.setattr, tmp_path / "hub-cache")
        stop = [False]

        def cancel_at_first_report(report: Any) -> None:
            stop[0] = True

        events = JobEvents(download=cancel_at_first_report, should_cancel=lambda: stop[0])
        with pytest.raises(Cancelled):
            run_job(make_job(tmp_path / "cancelled", model="test/tiny"), ModelCache(), events)
        assert not (tmp_path / "cancelled").exists()

        reports: list[Any] = []
        run_job(
            make_job(tmp_path / "hub", model="test/tiny"),
            ModelCache(),
            JobEvents(download=reports.append),
        )
    assert reports and {r.model for r in reports} == {"test/tiny"}
    assert reports[-1].bytes_done == reports[-1].bytes_total > 0
    run_job(make_job(tmp_path / "folder", model=str(folder)), ModelCache())
    np.testing.assert_array_equal(latents(tmp_path / "hub"), latents(tmp_path / "folder"))


@pytest.mark.parametrize(
    ("base_fields", "changed"),
    [
        ({}, {"guidance": 3.0}),
        ({}, {"seed": 7}),
        ({"smooth_bg": True, "masks": "MASK"}, {"smooth_alpha": 0.2}),
        (
            {"mode": "pix2pix", "model": "builtin:tiny-pix2pix", "video": "SOURCE"},
            {"image_guidance": 1.0},
        ),
        ({"mode": "controlnet", "controlnets": "CN"}, {"controlnets": "CN_HALF"}),
        ({}, {"negative_prompt": "blurry"}),
    ],
    ids=["guidance", "seed", "smooth_alpha", "image_guidance", "controlnet_weight", "negative"],
)
def test_every_generation_setting_reaches_the_engine(
    tmp_path: Path, cache: ModelCache, base_fields: dict, changed: dict
) -> None:
    """Each of the job's generation settings changes the result (none is dropped between the
    job and the engine, where the engine's own default would silently stand in)."""
    mask = tmp_path / "mask.png"
    write_png(mask, np.zeros((64, 64, 3), np.uint8))  # all background: smoothing acts
    control = str(bar(tmp_path / "control.png", 20))
    values = {
        "MASK": str(mask),
        "SOURCE": control,
        "CN": [{"model": "builtin:tiny-controlnet", "control": control, "weight": 1.0}],
        "CN_HALF": [{"model": "builtin:tiny-controlnet", "control": control, "weight": 0.5}],
    }

    def resolved(fields: dict) -> dict:
        return {k: values.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}

    common = {"frames": 2, "steps": 2, **resolved(base_fields)}
    run_job(make_job(tmp_path / "base", **common), cache)
    run_job(make_job(tmp_path / "changed", **{**common, **resolved(changed)}), cache)
    assert np.abs(latents(tmp_path / "changed") - latents(tmp_path / "base")).max() > 1e-4


def test_progress_reports_steps_then_frames(tmp_path: Path, cache: ModelCache) -> None:
    """Denoising reports (step, steps, 0 frames, frames) with steps counting up; decoding
    reports (steps, steps, frames written, frames), one report per decoded slice."""
    events: list[tuple] = []
    frames = runner.DECODE_SLICE + 1
    job = make_job(tmp_path / "run", frames=frames, steps=4)
    run_job(job, cache, JobEvents(progress=lambda *a: events.append(a)))
    denoising = [e for e in events if e[5] == "denoising"]
    decoding = [e for e in events if e[5] == "decoding"]
    assert events == denoising + decoding
    assert {e[1:4] for e in denoising} == {(4, 0, frames)}
    assert [e[0] for e in denoising] == sorted(e[0] for e in denoising)
    assert denoising[-1][0] == 4 and all(0 < e[4] <= 0.9 for e in denoising)
    assert [e[:4] for e in decoding] == [
        (4, 4, runner.DECODE_SLICE, frames),
        (4, 4, frames, frames),
    ]
    assert decoding[-1][4] == pytest.approx(1.0)


def test_no_movie_unless_asked_and_run_json_names_the_versions(
    tmp_path: Path, cache: ModelCache
) -> None:
    import platform

    from backend import __version__

    result = run_job(make_job(tmp_path / "run", frames=2, steps=2, write_mp4=False), cache)
    assert not (tmp_path / "run" / "video.mp4").exists()
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["backend"] == __version__ and info["torch"] == torch.__version__
    assert info["python"] == platform.python_version()
    assert result.extras == info and result.seconds == pytest.approx(info["seconds"], abs=1e-3)
    # job.json is for people too: indented, keys sorted (and run.json alike).
    text = (tmp_path / "run" / "job.json").read_text()
    saved = json.loads(text)
    assert text.startswith('{\n  "') and list(saved) == sorted(saved)
    run_text = (tmp_path / "run" / "run.json").read_text()
    assert run_text.startswith('{\n  "') and list(info) == sorted(info)


# --------------------------------------------------------------------------- hostile input


def test_a_dangling_symlink_as_out_is_refused_and_its_target_never_made(
    tmp_path: Path, cache: ModelCache
) -> None:
    target = tmp_path / "autostart" / "evil_result"
    link = tmp_path / "out"
    link.symlink_to(target)
    with pytest.raises(OutputExistsError, match="symbolic link") as info:
        run_job(make_job(link), cache)
    assert str(link) in str(info.value)
    assert not target.exists() and not target.parent.exists() and link.is_symlink()


def test_non_finite_final_latents_are_an_error_and_write_nothing(tmp_path: Path) -> None:
    """NaN weights (a broken LoRA, fp16 overflow) made black PNGs with exit 0."""
    own = ModelCache()
    run_job(make_job(tmp_path / "first", frames=2), own)
    (base,) = own._bases.values()
    with torch.no_grad():
        base.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(runner.NonFiniteError, match="NaN or infinite") as info:
        run_job(make_job(tmp_path / "second", frames=2), own)
    assert len(str(info.value).splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first"]  # no folder, no partial
