"""blender_t2vz/runtime.py: the runner's step against scripted fake workers (no backend).

The step applies worker messages to Blender; these cases need a worker that misbehaves on
purpose: one that ignores a cancel, one that sends an earlier job's messages, one whose job
finishes just as the user cancels.
"""

import functools
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import bpy
import pytest
from conftest import color_strip, write_png

from blender_t2vz import runtime, strips, worker_client

FAKE = str(Path(__file__).with_name("fake_worker.py"))


@pytest.fixture
def fake_runner(scene, monkeypatch: pytest.MonkeyPatch) -> runtime.Runner:
    """The add-on's runner, talking to the scripted fake worker."""
    fake = functools.partial(worker_client.WorkerClient, args=(FAKE,))
    monkeypatch.setattr(runtime, "WorkerClient", fake)
    runner = runtime.RUNNER
    runner.stop_worker()
    yield runner
    runner.job = None
    runner.stop_worker(timeout=2.0)


def submit(runner: runtime.Runner, prompt: str, out: Path) -> str:
    return runner.submit(
        {"prompt": prompt, "out": str(out)},
        scene=bpy.context.scene.name,
        above=1,
        start=1,
        name=prompt,
        python=sys.executable,
    )


def step_until(runner: runtime.Runner, done, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        runner.step()
        time.sleep(0.02)


def strips_of(scene) -> list:
    editor = scene.sequence_editor
    return list(getattr(editor, "strips", None) or getattr(editor, "sequences", []))


def test_a_worker_that_ignores_cancel_is_killed_after_the_timeout(
    fake_runner: runtime.Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The runner's clock is a stand-in: a busy machine pausing this test between two
    # steps must not count as the worker ignoring the cancel.
    clock = [100.0]
    monkeypatch.setattr(runtime, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    submit(fake_runner, "hang", tmp_path / "out")
    client = fake_runner.client
    step_until(fake_runner, lambda: fake_runner.ready)
    assert fake_runner.cancel()
    assert bpy.context.window_manager.t2vz_status.state == "CANCELLING"
    fake_runner.step()
    clock[0] += runtime.CANCEL_TIMEOUT
    fake_runner.step()
    assert fake_runner.busy  # not before the timeout
    clock[0] += 0.01
    fake_runner.step()
    assert not fake_runner.busy
    assert fake_runner.outcome.level == "WARNING"
    assert "did not stop in time" in fake_runner.outcome.message
    assert fake_runner.client is None
    deadline = time.monotonic() + 10
    while client.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not client.alive  # the stuck process was ended, not left running
    assert not strips_of(bpy.context.scene)


def test_messages_of_an_earlier_job_are_ignored(
    fake_runner: runtime.Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    status = bpy.context.window_manager.t2vz_status
    applied: list[tuple] = []
    real_apply = runtime.Runner._apply

    def apply_and_note(self, client, message):
        applied.append((message.get("type"), message.get("id")))
        real_apply(self, client, message)

    monkeypatch.setattr(runtime.Runner, "_apply", apply_and_note)
    submit(fake_runner, "stale", tmp_path / "out")
    # The earlier job's progress, preview, done and error arrive (its error comes last).
    step_until(fake_runner, lambda: ("error", "earlier") in applied)
    assert ("done", "earlier") in applied and status.state == "RUNNING"
    assert fake_runner.busy and fake_runner.outcome is None
    assert status.progress == 0.0 and status.preview_path == "" and status.error == ""
    assert not strips_of(bpy.context.scene)
    fake_runner.cancel()
    step_until(fake_runner, lambda: not fake_runner.busy)
    assert fake_runner.outcome.message == "Cancelled"


def test_a_job_that_finishes_as_it_is_cancelled_leaves_nothing(
    fake_runner: runtime.Runner, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    submit(fake_runner, "late", out)
    step_until(fake_runner, lambda: fake_runner.ready)
    fake_runner.cancel()
    step_until(fake_runner, lambda: not fake_runner.busy)
    assert (fake_runner.outcome.level, fake_runner.outcome.message) == ("INFO", "Cancelled")
    assert not out.exists()  # the folder the finished job made is removed again
    assert not strips_of(bpy.context.scene)


def _staging(folder: Path, pid: int) -> Path:
    """A backend staging folder (with a half-written frame) owned by process ``pid``."""
    from blender_t2vz import backend_paths

    path = folder / backend_paths.load_protocol().partial_name("shot", pid=pid)
    path.mkdir(parents=True)
    (path / "frame_00001.png").write_bytes(b"half")
    return path


def test_starting_a_job_sweeps_partial_folders_of_dead_processes(
    fake_runner: runtime.Runner, tmp_path: Path
) -> None:
    """Folders left by a worker killed outright (OOM killer, SIGKILL) stayed forever."""
    import os
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = _staging(tmp_path, dead.pid)
    running = _staging(tmp_path, os.getpid())
    submit(fake_runner, "a cat", tmp_path / "out")
    assert not stale.exists() and running.exists()
    step_until(fake_runner, lambda: not fake_runner.busy)


def test_a_crashed_worker_leaves_no_partial_folder(
    fake_runner: runtime.Runner, tmp_path: Path
) -> None:
    submit(fake_runner, "crash", tmp_path / "out")
    left = _staging(tmp_path, fake_runner.client.pid)  # as if it died while writing
    step_until(fake_runner, lambda: not fake_runner.busy)
    assert fake_runner.outcome.level == "ERROR"
    assert not left.exists()


# ------------------------------------------------ the step's rules, against a stand-in client


class StubClient:
    """A worker client stand-in: records requests, serves queued messages, never runs."""

    def __init__(self, alive: bool = True, pid: int = 4321, fail: bool = False) -> None:
        self.alive, self.pid, self.fail = alive, pid, fail
        self.returncode = None if alive else -9
        self.sent: list[tuple[str, dict]] = []
        self.queued: list[dict] = []
        self.stderr = ["loading", "Killed"]
        self.closed = False

    def send(self, kind: str, /, **payload) -> None:
        if self.fail:
            raise worker_client.WorkerError("gone")
        self.sent.append((kind, payload))

    def generate(self, job_id: str, job: dict, allow_pickle: bool = False) -> None:
        self.send("generate", id=job_id, job=job, allow_pickle=allow_pickle)

    def cancel(self, job_id: str) -> None:
        self.send("cancel", id=job_id)

    def poll(self) -> list[dict]:
        out, self.queued = self.queued, []
        return out

    def stderr_tail(self, lines: int = 20) -> str:
        return "\n".join(self.stderr[-lines:])

    def kill(self) -> None:
        self.alive = False

    def close(self, timeout: float = 5.0) -> None:
        self.closed = True

    def shutdown(self, timeout: float = 5.0) -> None:
        self.closed = True


@pytest.fixture
def runner(scene) -> runtime.Runner:
    """A runner of its own (not the add-on's) with a ready stand-in worker and a job."""
    status = bpy.context.window_manager.t2vz_status
    status.state, status.preview_path, status.worker_pid = "STARTING", "", 0
    status.cached_models.clear()
    runner = runtime.Runner()
    runner.client = StubClient()
    runner.job = runtime.ActiveJob("j1", {"out": "/nowhere/out"}, scene.name, 1, 5, "a cat")
    yield runner
    runner.client = None
    runner.shutdown()


def apply(runner: runtime.Runner, message_type: str, /, **fields) -> None:
    runner._apply(runner.client, {"type": message_type, "id": "j1", **fields})


def test_byte_counts_read_as_people_read_them() -> None:
    assert [runtime.format_bytes(n) for n in (0, 999, 1000, 1500, 999_999)] == [
        "0 B",
        "999 B",
        "1.0 KB",
        "1.5 KB",
        "1000.0 KB",
    ]
    assert runtime.format_bytes(3_400_000) == "3.4 MB"
    assert runtime.format_bytes(1e9) == "1.00 GB"
    assert runtime.format_bytes(12_345_678_900) == "12.35 GB"


def test_download_line_shows_rate_and_time_left_only_while_downloading() -> None:
    text = runtime.download_text({"model": "o/m", "bytes_done": 1000, "bytes_total": 3000})
    assert text == "Downloading o/m: 1.0 KB of 3.0 KB"  # no rate known yet
    going = {"model": "o/m", "bytes_done": 1000, "bytes_total": 3000, "rate": 500.0}
    assert runtime.download_text(going) == (
        "Downloading o/m: 1.0 KB of 3.0 KB at 500 B/s, 4 s left"
    )
    almost = {**going, "bytes_done": 2990, "file": "unet.bin"}
    assert runtime.download_text(almost).endswith(
        "(unet.bin): 3.0 KB of 3.0 KB at 500 B/s, 1 s left"
    )
    assert runtime.download_text({"model": "o/m", "bytes_done": None, "bytes_total": None}) == (
        "Downloading o/m: 0 B of 0 B"
    )


def test_ready_and_progress_update_the_status(runner: runtime.Runner) -> None:
    status = bpy.context.window_manager.t2vz_status
    runner._apply(runner.client, {"type": "ready", "pid": 777})
    assert runner.ready and status.worker_pid == 777
    assert (status.state, status.message) == ("RUNNING", "Running")
    apply(runner, "progress", fraction=0.25, step=3, total=10, frames_done=2, frames_total=8)
    assert status.progress == pytest.approx(0.25)
    assert status.message == "Denoising 8 frames: step 3 of 10"
    apply(runner, "progress", fraction=0.95, stage="decoding", frames_done=4, frames_total=8)
    assert status.message == "Writing frames: 4 of 8"
    apply(runner, "progress", fraction=None)
    assert status.progress == pytest.approx(0.95)  # the bar never goes back
    status.progress = 0.0
    apply(runner, "progress", fraction=0.9, id="an earlier job")
    assert status.progress == 0.0  # a late message of another job changes nothing
    before = status.message
    runner.job.cancel_at = time.monotonic()  # cancelling: the bar moves, the line stays
    apply(runner, "progress", fraction=0.75, step=9, total=10)
    assert status.progress == pytest.approx(0.75) and status.message == before


def test_step_counter_only_goes_up_across_text2videos_two_phases(runner) -> None:
    """Issue 19: frame 1 alone runs to t1, then all frames run again from step 1 of the
    backend's counter; the panel counts the job's steps from the overall fraction, and
    "frames 0/8" while denoising said nothing."""
    status = bpy.context.window_manager.t2vz_status
    runner.job.job = {"out": "/nowhere/out", "steps": 20, "frames": 8}
    shown = []
    # Phase 1 (frame 1 alone, steps 1..9 of its own counter), then the joint phase's 1..20.
    phase1 = [(s, 20, 0.9 * 0.02 * s) for s in range(1, 10)]
    phase2 = [(s, 20, 0.9 * (0.18 + 0.041 * s)) for s in range(1, 21)]
    for step, total, fraction in phase1 + phase2:
        apply(runner, "progress", step=step, total=total, fraction=fraction,
              frames_done=0, frames_total=8)  # fmt: skip
        shown.append(int(status.message.split("step ")[1].split(" of")[0]))
        assert status.message.startswith("Denoising 8 frames: step ")
        assert "frames 0" not in status.message
    assert shown == sorted(shown) and shown[-1] == 20
    assert len(set(shown)) > 10  # it moves, not stuck at one number


def test_cancel_empties_the_bar(runner) -> None:
    status = bpy.context.window_manager.t2vz_status
    apply(runner, "progress", step=5, total=10, fraction=0.6, frames_total=8)
    assert status.progress == pytest.approx(0.6)
    runner.job.cancel_at = time.monotonic()
    apply(runner, "cancelled")
    assert status.progress == 0.0 and status.message == "Cancelled"


def test_ready_after_a_cancel_keeps_cancelling(runner: runtime.Runner) -> None:
    status = bpy.context.window_manager.t2vz_status
    runner.client.pid = 55
    runner.job.cancel_at = time.monotonic()
    runner._apply(runner.client, {"type": "ready"})  # no pid in the message: the client's
    assert status.worker_pid == 55 and status.state == "CANCELLING"
    apply(runner, "accepted")
    assert runner.ready and status.state == "CANCELLING"


def test_accepted_marks_a_starting_job_running(runner: runtime.Runner) -> None:
    status = bpy.context.window_manager.t2vz_status
    status.message = "Starting the backend..."
    apply(runner, "accepted")
    assert runner.ready and (status.state, status.message) == ("RUNNING", "Running")


def test_download_progress_and_fetched(runner: runtime.Runner) -> None:
    status = bpy.context.window_manager.t2vz_status
    runner.job.kind, runner.job.name = "fetch", "o/m"
    apply(runner, "download", model="o/m", bytes_done=500, bytes_total=2000)
    assert status.progress == pytest.approx(0.25)
    assert status.message == "Downloading o/m: 500 B of 2.0 KB"
    apply(runner, "download", model="o/m", bytes_done=10, bytes_total=0)
    assert status.progress == pytest.approx(0.25)  # no total: the bar stays
    apply(runner, "fetched")
    assert not runner.busy and runner.outcome.level == "INFO"
    assert runner.outcome.message == "Downloaded o/m" and status.progress == 1.0
    ((kind, payload),) = runner.client.sent  # the preferences' model list is refreshed
    assert kind == "list_models" and runner.cache_requests == {payload["id"]: ""}


def test_failed_download_and_generation_say_which(runner: runtime.Runner, tmp_path) -> None:
    status = bpy.context.window_manager.t2vz_status
    staging = tmp_path / "staged"
    staging.mkdir()
    runner.job.staging = staging
    apply(runner, "error", kind="OSError", message="disk full", traceback="Traceback ...")
    assert runner.outcome.level == "ERROR" and not staging.exists()
    assert runner.outcome.message == "Generation failed: OSError: disk full"
    assert status.error == runner.outcome.message and status.message == ""
    assert status.state == "IDLE"
    runner.job = runtime.ActiveJob("j1", {}, "", 0, 0, "o/m", kind="fetch")
    apply(runner, "error")
    assert runner.outcome.message == "Download failed: Error: "
    runner.job = runtime.ActiveJob("j1", {}, "", 0, 0, "x", cancel_at=time.monotonic())
    apply(runner, "error", kind="Boom", message="while cancelling")
    assert (runner.outcome.level, runner.outcome.message) == ("INFO", "Cancelled")
    assert status.error == "" and status.message == "Cancelled"


def test_cancelled_removes_the_staged_inputs(runner: runtime.Runner, tmp_path) -> None:
    runner.job.staging = tmp_path / "staged"
    runner.job.staging.mkdir()
    apply(runner, "cancelled")
    assert (runner.outcome.level, runner.outcome.message) == ("INFO", "Cancelled")
    assert not (tmp_path / "staged").exists() and not runner.busy


def test_done_adds_the_strip_above_the_source_and_shows_the_last_frame(
    runner: runtime.Runner, tmp_path
) -> None:
    scene = bpy.context.scene
    color_strip(scene.sequence_editor, "user title", channel=2, start=1, length=10)
    frames = [str(write_png(tmp_path / f"frame_{i:05d}.png", 64, 64, (i, 0, 0))) for i in (1, 2)]
    apply(runner, "preview", path=str(tmp_path / "not_yet.png"))
    status = bpy.context.window_manager.t2vz_status
    assert status.preview_path == ""  # a frame that is not there is not shown
    apply(runner, "preview", path=frames[0])
    assert status.preview_path == frames[0] and runner.preview_key == frames[0]
    apply(runner, "done", frames=frames)
    assert runner.outcome.level == "INFO" and runner.outcome.frames == frames
    # Channel 2 is taken at frames 5-6, so the first free one above channel 1 is 3.
    assert runner.outcome.message == "Added 'a cat': 2 frames on channel 3 at frame 5"
    strip = strips.every_strip(scene.sequence_editor)[runner.outcome.strip_name]
    assert (strip.channel, strip.frame_final_start, strip.frame_final_duration) == (3, 5, 2)
    assert strips.stored_job(strip) == {"out": "/nowhere/out"}
    assert status.preview_path == frames[-1] and status.progress == 1.0
    assert status.message == runner.outcome.message and status.error == ""


def test_done_for_a_deleted_scene_says_where_the_frames_are(runner: runtime.Runner) -> None:
    runner.job.scene = "no such scene"
    apply(runner, "done", frames=[])
    assert runner.outcome.level == "WARNING"
    assert runner.outcome.message == "Scene 'no such scene' is gone; the frames are in /nowhere/out"


def test_done_without_frames_is_an_error_naming_the_folder(runner: runtime.Runner) -> None:
    apply(runner, "done", frames=[])
    assert runner.outcome.level == "ERROR"
    assert runner.outcome.message == (
        "Could not add the result strip: the result has no frames; frames in /nowhere/out"
    )


def test_model_cache_replies_fill_the_preferences_list(runner: runtime.Runner) -> None:
    status = bpy.context.window_manager.t2vz_status
    runner.cache_requests = {"l1": "", "r1": "o/a", "e1": ""}
    models = [{"model": "o/a", "size": 1500.0, "complete": True}, {"model": "o/b"}]
    runner._apply(
        runner.client, {"type": "models", "id": "l1", "models": models, "cache_dir": "/c"}
    )
    assert [(m.model, m.size, m.complete) for m in status.cached_models] == [
        ("o/a", 1500.0, True),
        ("o/b", 0.0, False),
    ]
    assert status.cache_dir == "/c" and status.cache_listed and status.cache_message == ""
    runner._apply(runner.client, {"type": "removed", "id": "r1", "freed": 2_500_000})
    assert status.cache_message == "Removed o/a (2.5 MB freed)"
    assert [m.model for m in status.cached_models] == ["o/b"]
    runner._apply(runner.client, {"type": "error", "id": "e1", "kind": "OSError", "message": "no"})
    assert status.cache_message == "OSError: no"
    runner.cache_requests = {"e2": "", "l2": "", "r2": "o/b"}
    runner._apply(runner.client, {"type": "error", "id": "e2"})
    assert status.cache_message == "Error: "
    runner._apply(runner.client, {"type": "models", "id": "l2", "models": [{"size": 1}]})
    assert [m.model for m in status.cached_models] == [""] and status.cache_dir == ""
    runner._apply(runner.client, {"type": "removed", "id": "r2"})
    assert status.cache_message == "Removed o/b (0 B freed)"
    assert runner.cache_requests == {} and runner.busy  # the job in flight is not touched


def test_worker_exit_ends_the_job_with_its_last_words(runner: runtime.Runner, tmp_path) -> None:
    status = bpy.context.window_manager.t2vz_status
    client = runner.client
    runner._apply(client, {"type": "_exit", "returncode": 1})  # before "ready": never started
    assert runner.outcome.level == "ERROR" and runner.client is None and status.worker_pid == 0
    assert runner.outcome.message == (
        "The backend failed to start (exit code 1): Killed. Check 'Backend Python' in the "
        "add-on's preferences, or click 'Install Backend'"
    )
    runner.client, runner.ready = client, True
    runner._worker_exited(StubClient(), 9)  # another (older) client's exit is not ours
    assert runner.client is client
    runner._worker_exited(client, -9)  # no job: the status line says it
    assert status.message == (
        "The backend worker stopped (killed by SIGKILL: out of memory, or stopped by hand): "
        "Killed. A new one starts with the next job"
    )
    runner.client, runner.ready = client, True
    runner.job = runtime.ActiveJob("j2", {"out": str(tmp_path / "o")}, "", 0, 0, "x")
    runner.job.cancel_at = time.monotonic()
    runner._worker_exited(client, -9)
    assert (runner.outcome.level, runner.outcome.message) == ("INFO", "Cancelled")


def test_a_worker_gone_silent_is_declared_dead_after_the_grace(
    runner: runtime.Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    monkeypatch.setattr(runtime, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    runner.client.alive, runner.client.returncode = False, -9
    runner.client.stderr = []
    assert runner.step() == runtime.INTERVAL_BUSY and runner.busy
    clock[0] += runtime.DEAD_GRACE
    assert runner.step() == runtime.INTERVAL_BUSY and runner.busy  # not before the grace
    clock[0] += 0.01
    assert runner.step() is None and not runner.busy
    assert runner.outcome.message.startswith(
        "The backend failed to start (killed by SIGKILL: out of memory, or stopped by hand). "
    )


def test_step_applies_every_queued_message_and_says_when_to_come_back(
    runner: runtime.Runner,
) -> None:
    runner.client.queued = [
        {"type": "_noise", "text": "a library's print"},
        {"type": "accepted", "id": "j1"},
        {"type": "cancelled", "id": "j1"},
    ]
    assert runner.step() == runtime.INTERVAL_IDLE  # idle, worker kept: look again later
    assert runner.outcome.message == "Cancelled" and runner.ready
    runner.client = None
    assert runner.step() is None  # nothing to watch: the timer stops


def test_cancel_asks_once_and_a_stopped_worker_ends_the_job(runner: runtime.Runner) -> None:
    status = bpy.context.window_manager.t2vz_status
    assert runner.cancel() and runner.cancel()
    assert runner.client.sent == [("cancel", {"id": "j1"})]
    assert (status.state, status.message) == ("CANCELLING", "Cancelling...")
    runner.job.cancel_at = None
    runner.client.fail = True
    assert runner.cancel()
    assert (runner.outcome.level, runner.outcome.message) == (
        "WARNING",
        "Cancelled (the worker had stopped)",
    )
    assert runner.client is None and not runner.cancel()


def test_submit_reuses_the_worker_and_retries_once_on_a_fresh_one(
    runner: runtime.Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[StubClient] = []

    def start(python, env=None):
        client = StubClient(pid=len(made) + 1)
        client.python, client.env = python, env
        client.start = lambda: None
        made.append(client)
        return client

    monkeypatch.setattr(runtime, "WorkerClient", start)
    status = bpy.context.window_manager.t2vz_status
    runner.client, runner.job = None, None
    kwargs = {"scene": "S", "above": 2, "start": 3, "name": "n", "python": "/py"}
    first = runner.submit({"out": ""}, **kwargs, allow_pickle=True)
    assert made[0].sent == [("generate", {"id": first, "job": {"out": ""}, "allow_pickle": True})]
    assert (status.state, status.message, status.worker_pid) == (
        "STARTING",
        "Starting the backend...",
        1,
    )
    with pytest.raises(runtime.RunnerBusyError):
        runner.submit({"out": ""}, **kwargs)
    runner.job, runner.ready = None, True
    runner.outcome = runtime.Outcome("old", "INFO", "an earlier job")
    status.progress, status.error, status.preview_path = 1.0, "an old error", "/old.png"
    second = runner.submit({"out": "/o"}, **kwargs, staging=Path("/staged"))
    assert len(made) == 1 and (status.state, status.message) == ("RUNNING", "Running")
    assert made[0].sent[-1] == (
        "generate",
        {"id": second, "job": {"out": "/o"}, "allow_pickle": False},
    )
    job = runner.job
    assert (job.id, job.scene, job.above, job.start, job.name) == (second, "S", 2, 3, "n")
    assert job.staging == Path("/staged") and runner.outcome is None
    assert (status.progress, status.error, status.preview_path) == (0.0, "", "")
    runner.job = None
    runner.submit({"out": ""}, **kwargs, env={"HF_HUB_OFFLINE": "1"})  # another environment
    assert len(made) == 2 and made[0].closed and runner.client is made[1]
    assert [(c.python, c.env) for c in made] == [("/py", None), ("/py", {"HF_HUB_OFFLINE": "1"})]
    runner.job = None
    made[1].fail = True  # died since the last job: one fresh worker gets the job
    runner.submit({"out": ""}, **kwargs, env={"HF_HUB_OFFLINE": "1"})
    assert len(made) == 3 and runner.client is made[2] and len(made[2].sent) == 1
    assert (made[2].python, made[2].env) == ("/py", {"HF_HUB_OFFLINE": "1"})
    runner.job = None
    made[2].fail = True
    monkeypatch.setattr(runtime, "WorkerClient", lambda python, env=None: made[2])
    made[2].returncode = 1
    with pytest.raises(worker_client.WorkerError, match=r"failed to start \(exit code 1\)"):
        runner.submit({"out": ""}, **kwargs, env={"HF_HUB_OFFLINE": "1"})
    assert runner.client is None and not runner.busy


def test_cache_requests_and_fetch_go_to_the_worker(
    runner: runtime.Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    status = bpy.context.window_manager.t2vz_status
    stub = runner.client
    runner.client_key = ("/py", ())
    first = runner.list_models(python="/py")
    assert status.cache_message == "Listing downloaded models..."
    second = runner.remove_model("o/a", python="/py")
    assert stub.sent == [
        ("list_models", {"id": first}),
        ("remove_model", {"id": second, "model": "o/a"}),
    ]
    assert runner.cache_requests == {first: "", second: "o/a"}
    assert status.cache_message == "Removing o/a..."
    with pytest.raises(runtime.RunnerBusyError):
        runner.fetch("o/m", python="/py")
    runner.job = None
    stub.fail = True  # a dead worker: the request goes to a new one
    fresh = StubClient()
    fresh.start = lambda: None
    asked: list = []
    monkeypatch.setattr(
        runtime, "WorkerClient", lambda python, env=None: asked.append((python, env)) or fresh
    )
    job_id = runner.fetch("o/m", python="/py", env={"A": "1"})
    assert asked == [("/py", {"A": "1"})] and isinstance(job_id, str) and job_id
    assert fresh.sent == [("fetch_model", {"id": job_id, "model": "o/m"})]
    assert (runner.job.kind, runner.job.name, runner.job.job) == ("fetch", "o/m", {"model": "o/m"})
    assert (status.state, status.message) == ("RUNNING", "Downloading o/m...")
    assert status.progress == 0.0 and status.error == "" and runner.outcome is None
    # A LoRA (or an embedding) says so; pickles only when the preference allows them.
    runner.job = None
    lora_id = runner.fetch("o/l/style.safetensors", python="/py", env={"A": "1"}, kind="lora",
                           allow_pickle=True)  # fmt: skip
    assert fresh.sent[-1] == (
        "fetch_model",
        {"id": lora_id, "model": "o/l/style.safetensors", "kind": "lora", "allow_pickle": True},
    )
    assert status.message == "Downloading o/l/style.safetensors..."


def test_installer_lines_and_exit(scene, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    status = bpy.context.window_manager.t2vz_status
    started: list = []

    class Proc(StubClient):
        def __init__(self, argv, cwd=None):
            super().__init__()
            self.argv, self.cwd, self.stderr = argv, cwd, []
            started.append(self)

        def start(self):
            pass

    monkeypatch.setattr(runtime, "LineProcess", Proc)
    installer = runtime.Installer()
    with pytest.raises(FileNotFoundError, match="install script not found"):
        installer.start(tmp_path / "venv", script=tmp_path / "missing.py")
    script = tmp_path / "install_deps.py"
    script.write_text("")
    installer.start(tmp_path / "venv", "cpu", script=script, detectors=True)
    (proc,) = started
    assert proc.argv[1:] == [
        str(script),
        "--venv",
        str(tmp_path / "venv"),
        "--torch",
        "cpu",
        "--detectors",
    ]
    assert Path(proc.cwd) == tmp_path and installer.running and status.install_running
    assert status.install_message == f"Installing into {tmp_path / 'venv'}..."
    with pytest.raises(runtime.RunnerBusyError):
        installer.start(tmp_path / "venv", script=script)
    proc.queued = [
        {"type": "_line", "text": "[t2vz]  step 1/3: torch  "},
        {"type": "_line", "text": "Collecting torch"},
    ]
    assert installer.step() and status.install_message == "step 1/3: torch"
    proc.queued = [{"type": "_exit", "returncode": 2}]
    assert not installer.step() and not installer.running and not status.install_running
    assert status.install_error == "Install failed (exit code 2): Collecting torch"
    assert not installer.step()
    for stderr, last in ((["pip: error", "No space left"], "No space left"), ([], "no output")):
        installer.start(tmp_path / "venv", script=script)
        installer.last_line = ""
        started[-1].stderr = stderr
        started[-1].queued = [{"type": "_exit", "returncode": 1}]
        installer.step()
        assert status.install_error == f"Install failed (exit code 1): {last}"
    installer.start(tmp_path / "venv", script=script)
    assert started[-1].argv[-1] == "auto"
    started[-1].queued = [{"type": "_exit", "returncode": 0}, {"type": "_line", "text": "[t2vz] x"}]
    assert not installer.step()
    assert status.install_message == "Backend installed" and status.install_error == ""


def test_wait_steps_until_the_job_ends_or_the_time_is_up(
    runner: runtime.Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in clock that its sleeps move on: the times below are the runner's own, not
    # those of a busy machine.
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    monkeypatch.setattr(runtime, "time", SimpleNamespace(monotonic=lambda: clock[0], sleep=sleep))
    runner.client.queued = [{"type": "cancelled", "id": "j1"}]
    outcome = runner.wait(5)
    assert outcome is runner.outcome and outcome.message == "Cancelled"
    assert clock[0] <= 0.05  # back as soon as the job has ended: one interval at most
    runner.job = runtime.ActiveJob("j2", {}, "", 0, 0, "x")
    runner.outcome = runtime.Outcome("j1", "INFO", "an earlier job")
    clock[0] = 0.0
    assert runner.wait(0.2) is None and runner.busy  # still running: no outcome yet
    assert 0.2 <= clock[0] < 0.3  # stepped (every 0.05 s) until the time was up


def test_a_new_runner_has_no_worker_job_or_preview() -> None:
    fresh = runtime.Runner()
    assert (fresh.client, fresh.client_key, fresh.job, fresh.outcome) == (None, None, None, None)
    assert not fresh.busy and not fresh.worker_alive and fresh.ready is False
    assert fresh.preview_key == "" and fresh.preview_icon_id() == 0 and fresh.cache_requests == {}
    assert fresh.step() is None and fresh.wait(0.01) is None


# ------------------------------------------------ where results land (issue 19)


def _done(runner: runtime.Runner, tmp_path: Path, tag: str, **job_fields) -> object:
    frames = [
        str(write_png(tmp_path / tag / f"frame_{i:05d}.png", 64, 64, (i, 0, 0))) for i in (1, 2)
    ]
    if job_fields:
        runner.job = runtime.ActiveJob("j1", {"out": str(tmp_path / tag)}, **job_fields)
    apply(runner, "done", frames=frames)
    assert runner.outcome.level == "INFO", runner.outcome
    return strips.every_strip(bpy.context.scene.sequence_editor)[runner.outcome.strip_name]


def test_result_lands_above_every_strip_it_overlaps_active_and_alone_selected(
    runner: runtime.Runner, tmp_path
) -> None:
    """A gap at channel 2 under an opaque colour strip on 3: the result goes on 4, where it
    is seen, and becomes the active strip and the only selection."""
    editor = bpy.context.scene.sequence_editor
    source = color_strip(editor, "source", channel=1, start=1, length=20)
    cover = color_strip(editor, "title card", channel=3, start=4, length=3)
    elsewhere = color_strip(editor, "later", channel=9, start=50, length=3)
    for strip in (source, cover, elsewhere):
        strip.select = True
    editor.active_strip = cover
    result = _done(runner, tmp_path, "a")
    assert (result.channel, result.frame_final_start) == (4, 5)
    assert editor.active_strip == result
    assert [s.name for s in strips.every_strip(editor) if s.select] == [result.name]
    assert (cover.channel, cover.select, source.select) == (3, False, False)


def test_takes_are_numbered_named_and_earlier_ones_muted(runner: runtime.Runner, tmp_path):
    scene = bpy.context.scene
    editor = scene.sequence_editor
    first = _done(runner, tmp_path, "t1")
    group, number = strips.take_of(first)
    assert group and number == 1 and first.name == "a cat" and not first.mute
    second = _done(
        runner, tmp_path, "t2", scene=scene.name, above=first.channel, start=5, name="a cat",
        take_group=group,
    )  # fmt: skip
    assert strips.take_of(second) == (group, 2) and second.name == "a cat take 2"
    assert first.mute and not second.mute and second.channel > first.channel
    third = _done(
        runner, tmp_path, "t3", scene=scene.name, above=second.channel, start=5, name="a cat",
        take_group=group,
    )  # fmt: skip
    assert third.name == "a cat take 3" and first.mute and second.mute and not third.mute
    assert [s.name for s in strips.takes(editor, group)] == [first.name, second.name, third.name]
    # A/B: showing take 1 mutes the others.
    assert bpy.ops.t2vz.take_show(strip_name=first.name) == {"FINISHED"}
    assert not first.mute and second.mute and third.mute
    # Another Generate is a group of its own: nothing of this group is muted by it.
    other = _done(runner, tmp_path, "o", scene=scene.name, above=0, start=5, name="a dog")
    assert strips.take_of(other)[0] != group and not first.mute


def test_take_names_fit_blenders_63_bytes() -> None:
    assert strips.take_name("x" * 80, 12) == "x" * 55 + " take 12"
    assert len(strips.take_name("é" * 40, 3).encode()) <= 63
    assert strips.take_name("a cat", 1) == "a cat"


def test_status_forgets_a_result_that_undo_removed(runner: runtime.Runner, tmp_path) -> None:
    status = bpy.context.window_manager.t2vz_status
    result = _done(runner, tmp_path, "u")
    assert status.message.startswith("Added 'a cat'") and status.progress == 1.0
    assert runtime.forget_removed_result in bpy.app.handlers.undo_post
    runtime.forget_removed_result()  # the strip is there: the status stays
    assert status.message.startswith("Added")
    strips.top_strips(bpy.context.scene.sequence_editor).remove(result)  # what undo does
    runtime.forget_removed_result()
    assert status.message == "" and status.progress == 0.0 and status.result_strip == ""


def test_results_are_stored_relative_to_the_saved_blend(runner, tmp_path) -> None:
    """Following Preferences > File Paths > Relative Paths, so the project can move."""
    filepaths = bpy.context.preferences.filepaths
    result = _done(runner, tmp_path, "r")  # an unsaved file: absolute
    assert not result.directory.startswith("//")
    blend = str(tmp_path / "project" / "edit.blend")
    runtime.relative_results(blend)  # save_pre of the first save
    assert result.directory == "//../r/"
    assert Path(bpy.path.abspath(result.directory, start=str(tmp_path / "project"))).resolve() == (
        tmp_path / "r"
    )
    result.directory = str(tmp_path / "r") + "/"
    filepaths.use_relative_paths = False
    try:
        runtime.relative_results(blend)
        assert not result.directory.startswith("//")
    finally:
        filepaths.use_relative_paths = True


def test_setting_the_output_folder_to_a_blend_relative_path_does_not_warn(scene) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scene.t2vz.output_dir = "//t2vz/"
    assert scene.t2vz.bl_rna.properties["output_dir"].subtype == "DIR_PATH"


def test_a_jobs_speed_is_measured_from_its_first_progress_and_saved(runner, tmp_path) -> None:
    """The worker's start and the model's loading are not the job's speed; the speed is
    saved in the preferences with the device run.json names."""
    prefs = bpy.context.preferences.addons["blender_t2vz"].preferences
    kept = prefs.job_speeds
    out = tmp_path / "sped"
    spec = {"out": str(out), "steps": 10, "width": 512, "height": 512}
    job = {**spec, "model": "m", "device": "auto"}
    runner.job = runtime.ActiveJob("j1", job, bpy.context.scene.name, 1, 5, "x")
    runner.job.started -= 100.0  # a slow start: not counted
    apply(runner, "progress", fraction=0.5, stage="denoising")
    since = runner.job.clock[0]
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"device": "cuda:0"}))
    try:
        _done(runner, tmp_path, "sped")
        # 2 frames x 10 steps = 20 units; half of them after the first progress message.
        elapsed = time.monotonic() - since
        assert 0 < runner.seconds_per_unit <= elapsed / 10
        saved = runtime.saved_speeds()
        assert saved["speeds"]["auto|m"] == runner.seconds_per_unit
        assert saved["devices"] == {**saved["devices"], "auto": "cuda"}
    finally:
        prefs.job_speeds = kept
    job = runtime.ActiveJob("j2", {}, "", 0, 0, "y", clock=(10.0, 0.2))
    assert runtime.measured_speed(job, 4.0, 18.0) == pytest.approx(8.0 / (4.0 * 0.8))
