"""blender_t2vz/runtime.py: the runner's step against scripted fake workers (no backend).

The step applies worker messages to Blender; these cases need a worker that misbehaves on
purpose: one that ignores a cancel, one that sends an earlier job's messages, one whose job
finishes just as the user cancels.
"""

import functools
import sys
import time
from pathlib import Path

import bpy
import pytest

from blender_t2vz import runtime, worker_client

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
    monkeypatch.setattr(runtime, "CANCEL_TIMEOUT", 0.5)
    submit(fake_runner, "hang", tmp_path / "out")
    client = fake_runner.client
    step_until(fake_runner, lambda: fake_runner.ready)
    assert fake_runner.cancel()
    assert bpy.context.window_manager.t2vz_status.state == "CANCELLING"
    fake_runner.step()
    assert fake_runner.busy  # not before the timeout
    time.sleep(0.6)
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
    fake_runner: runtime.Runner, tmp_path: Path
) -> None:
    status = bpy.context.window_manager.t2vz_status
    submit(fake_runner, "stale", tmp_path / "out")
    step_until(fake_runner, lambda: status.state == "RUNNING")
    for _ in range(20):  # the earlier job's progress, preview, done and error arrive
        fake_runner.step()
        time.sleep(0.02)
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
