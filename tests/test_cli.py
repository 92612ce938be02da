"""backend/service/cli.py: ``python -m backend generate`` end to end (subprocesses) and its arguments.

Each generating subprocess pays the torch import (~5-8 s), so there are few of them: one
per mode, one regeneration from job.json with --frame-range, and the refusals.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from backend.media.video_io import write_png
from backend.protocol import DEFAULT_MODEL, MAX_LINE_BYTES, JobError, validate_job
from backend.service.cli import build_parser, job_from_args, main

Run = Callable[..., subprocess.CompletedProcess]
SMALL = ["--width", "64", "--height", "64", "--steps", "3", "--device", "cpu"]


def generate(run_backend: Run, *args: str) -> subprocess.CompletedProcess:
    return run_backend("generate", *SMALL, *args)


def check_result(out: Path, frames: int) -> tuple[dict, np.ndarray]:
    """The folder holds the frames, a job.json that validates again, and the latents."""
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"frame_{i:05d}.png" for i in range(1, frames + 1)]
    for png in pngs:
        image = cv2.imread(str(out / png))
        assert image.shape == (64, 64, 3)
    saved = json.loads((out / "job.json").read_text())
    job = validate_job(saved)
    assert job.out == str(out.resolve())
    latents = np.load(out / "latents.npy")
    assert latents.shape == (frames, 4, 8, 8) and latents.dtype == np.float32
    assert not list(out.parent.glob(".*partial*"))
    return saved, latents


@pytest.fixture(scope="module")
def text2video_run(run_backend: Run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "t2v"
    proc = generate(
        run_backend,
        "--model", "builtin:tiny", "--prompt", "a cat", "--frames", "4",
        "--seed", "7", "--save-latents", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(f"wrote 4 frames to {out.resolve()}")
    return out


def test_text2video_end_to_end(text2video_run: Path) -> None:
    saved, _ = check_result(text2video_run, 4)
    assert saved["mode"] == "text2video" and saved["seed"] == 7
    assert saved["motion"] == [12.0, 12.0] and (saved["t0"], saved["t1"]) == (1, 2)
    assert (text2video_run / "video.mp4").is_file()
    assert json.loads((text2video_run / "run.json").read_text())["device"] == "cpu"


def test_regenerate_a_frame_range_from_job_json(
    run_backend: Run, text2video_run: Path, tmp_path: Path
) -> None:
    """--job job.json reproduces the run; --frame-range 2:3 gives exactly those frames."""
    out = tmp_path / "shard"
    proc = run_backend(
        "generate", "--job", str(text2video_run / "job.json"), "--out", str(out),
        "--frame-range", "2:3", "--chunk-size", "1", "--no-mp4",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["frame_00002.png", "frame_00003.png"]
    saved = validate_job(json.loads((out / "job.json").read_text()))
    assert saved.frame_range == [2, 3] and saved.chunk_size == 1 and not saved.write_mp4
    full = np.load(text2video_run / "latents.npy")
    np.testing.assert_allclose(np.load(out / "latents.npy"), full[1:3], rtol=1e-5, atol=1e-4)


def test_controlnet_end_to_end(run_backend: Run, tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.mkdir()
    for i in range(3):
        image = np.zeros((64, 64, 3), np.uint8)
        image[10:50, 5 + 8 * i : 25 + 8 * i] = 255
        write_png(control / f"c_{i + 1}.png", image)
    out = tmp_path / "out"
    proc = generate(
        run_backend,
        "--mode", "controlnet", "--model", "builtin:tiny", "--prompt", "a robot",
        "--controlnet", "builtin:tiny-controlnet:0.8", "--control", str(control),
        "--detector", "canny", "--frames", "3", "--no-mp4", "--save-latents", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    saved, latents = check_result(out, 3)
    assert saved["controlnets"] == [
        {
            "model": "builtin:tiny-controlnet",
            "weight": 0.8,
            "detector": "canny",
            "control": {"path": str(control), "start": 0, "stride": 1.0},
            "config": None,  # no --controlnet-config: the shipped SD 1.5 ControlNet config
        }
    ]
    assert saved["motion"] == [0.0, 0.0] and saved["t0"] is None
    assert not (out / "video.mp4").exists()
    assert np.abs(latents[1] - latents[0]).max() > 1e-2  # the control video moves


def test_pix2pix_end_to_end(run_backend: Run, tmp_path: Path) -> None:
    movie = tmp_path / "source.mp4"
    writer = cv2.VideoWriter(str(movie), cv2.VideoWriter_fourcc(*"mp4v"), 8.0, (96, 64))
    if not writer.isOpened():
        pytest.skip("this OpenCV build has no mp4v encoder")
    for i in range(4):
        writer.write(np.full((64, 96, 3), 50 * i, np.uint8))
    writer.release()
    out = tmp_path / "out"
    proc = generate(
        run_backend,
        "--mode", "pix2pix", "--model", "builtin:tiny-pix2pix", "--prompt", "make it snow",
        "--video", str(movie), "--frames", "2", "--save-latents", "--no-mp4", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    saved, _ = check_result(out, 2)
    assert saved["mode"] == "pix2pix" and saved["video"]["path"] == str(movie)


def test_existing_out_is_refused_and_untouched(run_backend: Run, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "frame_00001.png").write_bytes(b"the user's own file")
    proc = generate(run_backend, "--model", "builtin:tiny", "--prompt", "x", "--out", str(out))
    assert proc.returncode == 1
    assert "already exists" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["frame_00001.png"]
    assert (out / "frame_00001.png").read_bytes() == b"the user's own file"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_a_failing_job_leaves_no_folder(run_backend: Run, tmp_path: Path) -> None:
    video = tmp_path / "video"
    video.mkdir()
    write_png(video / "only.png", np.zeros((64, 64, 3), np.uint8))
    out = tmp_path / "out"
    proc = generate(
        run_backend,
        "--mode", "pix2pix", "--model", "builtin:tiny-pix2pix", "--prompt", "x",
        "--video", str(video), "--frames", "3", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 1
    assert "VideoInputError" in proc.stderr and "1 images" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video"]
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--width", "100"], "width"),
        (["--steps", "1"], "steps"),
        (["--frames", "4", "--frame-range", "2:9"], "frame_range[1]"),
        (["--mode", "controlnet"], "controlnets"),
        (["--mode", "pix2pix"], "video"),
        (["--controlnet", "a", "--controlnet", "b", "--control", "c"], "controlnets"),
        (["--guidance", "-3"], "guidance"),
    ],
)
def test_bad_jobs_exit_2_naming_the_field(
    run_backend: Run, tmp_path: Path, args: list[str], field: str
) -> None:
    out = tmp_path / "out"
    proc = run_backend("generate", "--prompt", "x", "--out", str(out), *args)
    assert proc.returncode == 2
    assert f"error: bad job: {field}: " in proc.stderr
    assert proc.stdout == "" and not out.exists()


def test_bad_job_files_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"prompt": "x", "out": str(tmp_path / "o"), "colour": "red"}))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    for path, text in (
        (unknown, "colour: unknown field"),
        (listed, "must hold a JSON object"),
        (tmp_path / "missing.json", "cannot read job file"),
    ):
        assert main(["generate", "--job", str(path)]) == 2
        assert text in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        # A RecursionError traceback before; now one line and exit 2.
        (
            b'{"prompt": "x", "out": "o", "seed": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "nested",
        ),
        (b'{"prompt": "\xff\xfe", "out": "o"}', "not UTF-8"),
        (b'{"prompt": "' + b"x" * MAX_LINE_BYTES + b'", "out": "o"}', "larger than the limit"),
        (b'{"prompt": "x", "out": "o", "frames": "' + b"9" * 500_000 + b'"}', "500000 characters"),
    ],
)
def test_hostile_job_files_exit_2_with_one_short_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, content: bytes, reason: str
) -> None:
    path = tmp_path / "job.json"
    path.write_bytes(content)
    assert main(["generate", "--job", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad job: ") and reason in err
    assert len(err) < 400 and "Traceback" not in err


def test_only_the_flag_allows_pickle_never_the_job_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job file's allow_pickle: true used to turn pickle loading on by itself."""
    import backend.service.runner

    calls: list[bool] = []

    def fake_run_job(job, cache=None, events=None, *, allow_pickle=False):
        calls.append(allow_pickle)
        raise RuntimeError("stop here")

    monkeypatch.setattr(backend.service.runner, "run_job", fake_run_job)
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"prompt": "x", "out": str(tmp_path / "o"), "allow_pickle": True}))
    assert main(["generate", "--job", str(path)]) == 1
    assert main(["generate", "--job", str(path), "--allow-pickle"]) == 1
    assert calls == [False, True]


@pytest.mark.parametrize(
    ("signame", "code", "said"), [("SIGINT", -2, "interrupted"), ("SIGHUP", 129, "")]
)
def test_ctrl_c_and_a_closed_terminal_leave_nothing_and_no_traceback(
    backend_env: dict, tiny_models: dict, tmp_path: Path, signame: str, code: int, said: str
) -> None:
    """Ctrl-C printed a traceback; SIGHUP (closing the terminal) left a partial folder.

    Ctrl-C ends the process killed by SIGINT (-2 here, 130 in a shell), every time: it
    used to exit with 130 or, depending on where the interrupt landed, be killed.
    """
    import signal
    import sys
    import time

    results = tmp_path / "results"
    # Half a minute unless interrupted: still denoising when the signal lands, however late.
    args = ["--model", "builtin:tiny", "--frames", "8", "--steps", "500", "--no-mp4"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend", "generate", *SMALL, *args, "--prompt", "x"]
        + ["--out", str(results / "out")],
        cwd=Path(__file__).resolve().parent.parent,
        env=backend_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell without job control starts background commands with SIGINT ignored, and
        # Python keeps an inherited SIG_IGN: give the child the default, as a terminal does.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 600  # imports and loading take minutes on a busy machine
    while not list(results.glob(".out.partial-*")):  # denoising has begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(getattr(signal, signame))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and said in stderr
    assert list(results.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize(("status", "code"), [(130, -2), (1, 1), (0, 0), (143, 143)])
def test_only_an_interrupted_run_ends_killed_by_sigint(
    backend_env: dict, status: int, code: int
) -> None:
    """A shell loop over shots stops on Ctrl-C only if the program dies by SIGINT."""
    import sys

    script = f"from backend.service.cli import exit_as_program; print('flushed'); exit_as_program({status})"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parent.parent,
        env=backend_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stdout) == (code, "flushed\n"), proc.stderr


def test_library_info_logs_stay_quiet_without_verbose(tiny_models: dict, tmp_path: Path) -> None:
    """Our INFO lines show; a library's that leaves its level to the root only with -v."""
    import logging

    root = logging.getLogger()
    before = (root.level, logging.getLogger("backend").level)
    argv = ["generate", *SMALL, "--model", "builtin:tiny", "--frames", "1", "--no-mp4"]
    try:
        for verbose, shown in (([], False), (["-v"], True)):
            out = tmp_path / f"out{len(verbose)}"
            assert main([*verbose, *argv, "--prompt", "x", "--out", str(out)]) == 0
            assert logging.getLogger("backend").isEnabledFor(logging.DEBUG) is shown
            assert logging.getLogger("some_library").isEnabledFor(logging.INFO) is shown
            assert logging.getLogger("backend.service.runner").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(before[0])
        logging.getLogger("backend").setLevel(before[1])


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_is_one_line_naming_the_cause_and_the_path(
    tiny_models: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from test_runner import _full_disk_for_pngs

    _full_disk_for_pngs(monkeypatch)
    out = tmp_path / "out"
    argv = ["generate", *SMALL, "--model", "builtin:tiny", "--frames", "1", "--no-mp4"]
    assert main([*argv, "--prompt", "x", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: OSError: ") and "No space left on device" in err
    assert str(tmp_path) in err and "frame_00001.png" in err
    assert list(tmp_path.iterdir()) == []


def test_the_default_hub_model_offline_is_one_clear_line(run_backend: Run, tmp_path: Path) -> None:
    """Leaving the model empty offline used to mean minutes of retries and a raw error."""
    out = tmp_path / "out"
    proc = run_backend(
        "generate", "--prompt", "x", "--out", str(out), "--device", "cpu", timeout=600
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ModelLoadError: model ")
    assert f"{DEFAULT_MODEL!r}" in last and "give a local folder or .safetensors file" in last
    assert not out.exists()


def test_controlnet_configs_one_for_all_or_one_each() -> None:
    pairs = ["--controlnet", "a.safetensors", "--control", "c1"]
    pairs += ["--controlnet", "b.safetensors", "--control", "c2"]
    one = parse(*pairs, "--controlnet-config", "cfg")["controlnets"]
    assert [c["config"] for c in one] == ["cfg", "cfg"]
    each = parse(*pairs, "--controlnet-config", "x", "--controlnet-config", "y")["controlnets"]
    assert [c["config"] for c in each] == ["x", "y"]
    assert "config" not in parse(*pairs)["controlnets"][0]
    fields = {"prompt": "p", "out": "o", "mode": "controlnet"}
    job = validate_job({**parse(*pairs, "--controlnet-config", "cfg"), **fields})
    assert job.controlnets[1].config == "cfg"
    with pytest.raises(JobError, match="--controlnet-config"):
        parse(*pairs, *["--controlnet-config", "x"] * 3)


# --------------------------------------------------------------------------- arguments


def parse(*argv: str) -> dict:
    return job_from_args(build_parser().parse_args(["generate", *argv]))


def test_controlnet_weights_and_paths_with_colons() -> None:
    job = parse(
        "--controlnet", "builtin:tiny-controlnet", "--control", "a",
        "--controlnet", "builtin:tiny-controlnet:0.25", "--control", "b",
        "--controlnet", "C:\\models\\canny.safetensors", "--control", "c",
        "--detector", "canny", "--detector", "none", "--detector", "openpose",
    )  # fmt: skip
    assert [(c["model"], c["weight"], c["detector"]) for c in job["controlnets"]] == [
        ("builtin:tiny-controlnet", 1.0, "canny"),
        ("builtin:tiny-controlnet", 0.25, "none"),
        ("C:\\models\\canny.safetensors", 1.0, "openpose"),
    ]
    with pytest.raises(JobError, match="one per --control"):
        parse("--controlnet", "m", "--control", "a", "--detector", "canny", "--detector", "none")


def test_union_control_types_pair_with_the_controls() -> None:
    job = parse(
        "--controlnet", "xinsir/union", "--control", "a", "--controlnet", "xinsir/union",
        "--control", "b", "--control-type", "depth", "--control-type", "canny",
    )  # fmt: skip
    assert [c["control_type"] for c in job["controlnets"]] == ["depth", "canny"]
    assert [c.control_type for c in validate_job({**job, "prompt": "p", "out": "o",
                                                   "mode": "controlnet"}).controlnets] == [
        "depth", "canny"]  # fmt: skip
    with pytest.raises(JobError, match="no --control-type or one per --control"):
        parse("--controlnet", "m", "--control", "a", "--control-type", "depth",
              "--control-type", "canny")  # fmt: skip
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--control-type", "sketchy"])


def test_detector_models_go_to_the_controlnets_whose_detector_loads_the_role() -> None:
    job = parse(
        "--controlnet", "pose-cn", "--control", "a", "--detector", "openpose",
        "--controlnet", "depth-cn", "--control", "b", "--detector", "depth",
        "--detector-model", "pose=me/vitpose-large", "--detector-model", "depth=/w/depth",
    )  # fmt: skip
    assert [c.get("detector_models") for c in job["controlnets"]] == [
        {"pose": "me/vitpose-large"},
        {"depth": "/w/depth"},
    ]
    spec = validate_job({**job, "prompt": "p", "out": "o", "mode": "controlnet"}).controlnets[0]
    assert spec.detector_models == {"pose": "me/vitpose-large"}


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("pose", "wants ROLE=MODEL, got 'pose'"),
        ("=me/x", "wants ROLE=MODEL"),
        ("depth=me/x", "loads the role 'depth'; roles: depth, person, pose"),
    ],
)
def test_bad_detector_models_are_refused_naming_them(pair: str, message: str) -> None:
    with pytest.raises(JobError, match=message):
        parse("--controlnet", "m", "--control", "a", "--detector", "openpose",
              "--detector-model", pair)  # fmt: skip
    with pytest.raises(JobError, match="--detector-model applies to the --controlnet"):
        parse("--detector-model", "pose=me/x")


def test_loras_and_embeddings_parse_with_windows_paths() -> None:
    job = parse(
        "--lora", "C:\\loras\\style.safetensors", "--lora", "owner/lora:0.5",
        "--lora", "/loras/x.safetensors:-1",
        "--embedding", "C:\\emb\\shiny.safetensors:<shiny>",
    )  # fmt: skip
    assert job["loras"] == [
        {"path": "C:\\loras\\style.safetensors", "weight": 1.0},
        {"path": "owner/lora", "weight": 0.5},
        {"path": "/loras/x.safetensors", "weight": -1.0},
    ]
    assert job["embeddings"] == [{"path": "C:\\emb\\shiny.safetensors", "token": "<shiny>"}]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--embedding", "shiny.safetensors"])


def test_flags_override_a_job_file_and_new_steps_rescale_t0_t1(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"prompt": "old", "out": "o", "steps": 50, "t0": 44, "t1": 47}))
    job = parse("--job", str(path), "--prompt", "new", "--steps", "10")
    assert job["prompt"] == "new" and "t0" not in job and "t1" not in job
    assert (validate_job(job).t0, validate_job(job).t1) == (8, 9)  # scaled to 10 steps
    kept = parse("--job", str(path), "--seed", "3")
    assert (kept["t0"], kept["t1"], kept["seed"]) == (44, 47, 3)


def test_frame_range_and_flags_parse() -> None:
    job = parse(
        "--frame-range", "3:5", "--motion", "4", "-2", "--no-mp4", "--smooth-bg",
        "--save-latents", "--allow-pickle",
    )  # fmt: skip
    assert job["frame_range"] == [3, 5] and job["motion"] == [4.0, -2.0]
    assert job["write_mp4"] is False and job["smooth_bg"] is True
    assert job["save_latents"] is True and job["allow_pickle"] is True
    assert "seed" not in job  # unset flags leave the schema's defaults
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["generate", "--frame-range", "3-5"])
    assert info.value.code == 2


def test_preset_fills_flags_left_out_and_shows_in_the_job() -> None:
    job = parse("--preset", "official-controlnet", "--prompt", "a robot", "--steps", "12")
    assert job["mode"] == "controlnet" and job["steps"] == 12 and job["guidance"] == 9.0
    assert job["prompt"] == "a robot, best quality, extremely detailed"
    assert job["negative_prompt"].startswith("longbody, lowres")
    plain = parse("--prompt", "a robot")
    assert plain["prompt"] == "a robot" and "negative_prompt" not in plain


def test_fit_and_one_side_parse() -> None:
    job = parse("--fit", "pad", "--width", "768")
    assert job["fit"] == "pad" and job["width"] == 768 and "height" not in job
    assert validate_job({**job, "prompt": "p", "out": "o"}).height is None  # from the input
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--fit", "zoom"])


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--controlnet-config", "cfg"], "--controlnet-config"),
        (["--detector", "canny"], "--detector"),
        (["--control-type", "depth"], "--control-type"),
    ],
)
def test_controlnet_options_without_controlnets_are_refused(flags: list[str], named: str) -> None:
    """A ControlNet config or detector with no --controlnet/--control pair used to be dropped
    without a word."""
    with pytest.raises(JobError, match=f"{named} applies to the --controlnet/--control pairs"):
        parse("--mode", "controlnet", "--prompt", "p", *flags)


# --------------------------------------------------------------------------- hostile input


def test_a_job_files_own_out_is_printed_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A shared job.json may aim anywhere; the user sees where before anything is written."""
    import backend.service.runner

    seen: list[tuple[str, str]] = []

    def fake_run_job(job, cache=None, events=None, *, allow_pickle=False):
        seen.append((job.out, capsys.readouterr().err))  # what was printed before the run
        raise RuntimeError("stop here")

    monkeypatch.setattr(backend.service.runner, "run_job", fake_run_job)
    aimed = tmp_path / "autostart" / ".." / "autostart" / "evil_result"
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"prompt": "x", "out": str(aimed)}))
    assert main(["generate", "--job", str(path)]) == 1
    out, printed = seen[-1]
    assert out == str(aimed)
    assert f"job file {path}: writing to {tmp_path / 'autostart' / 'evil_result'}" in printed
    mine = tmp_path / "mine"
    assert main(["generate", "--job", str(path), "--out", str(mine)]) == 1
    assert seen[-1][0] == str(mine) and "writing to" not in seen[-1][1]


def test_a_private_key_given_as_job_is_never_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    key = tmp_path / "id_ed25519"
    key.write_text(
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"
    )
    assert main(["generate", "--job", str(key)]) == 2
    err = capsys.readouterr().err
    assert str(key) in err and "not JSON" in err
    assert "PRIVATE" not in err and "b3Bl" not in err and len(err.splitlines()) == 1
