"""The worker client against a fake worker: queueing, noise, exit, stderr (no bpy used)."""

import sys
import time
from pathlib import Path

import pytest

from blender_t2vz import backend_paths, worker_client

FAKE = str(Path(__file__).with_name("fake_worker.py"))


def _until(client: worker_client.LineProcess, kind: str, timeout: float = 20.0) -> list[dict]:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = client.wait_message(0.2)
        if message is None:
            continue
        seen.append(message)
        if message["type"] == kind:
            return seen
    raise AssertionError(f"no {kind!r} message, got {seen}")


@pytest.fixture
def fake() -> worker_client.WorkerClient:
    client = worker_client.WorkerClient(sys.executable, args=(FAKE,))
    client.start()
    yield client
    client.kill()


def test_messages_are_queued_in_order_and_noise_is_marked(fake: worker_client.WorkerClient) -> None:
    fake.generate("j1", {"prompt": "a cat", "out": "/nowhere"})
    seen = _until(fake, "done")
    kinds = [m["type"] for m in seen]
    assert kinds == ["ready", "accepted", worker_client.NOISE, "progress", "done"]
    assert seen[-1]["id"] == "j1"
    assert "some library printed this" in fake.stderr_tail()


def test_allow_pickle_travels_beside_the_job_never_from_it(
    fake: worker_client.WorkerClient,
) -> None:
    """Only the preference (the generate argument) sets the request's allow_pickle."""
    fake.generate("p1", {"prompt": "a cat", "out": "/nowhere", "allow_pickle": True})
    assert _until(fake, "done")[-1]["allow_pickle"] is False
    fake.generate("p2", {"prompt": "a cat", "out": "/nowhere"}, allow_pickle=True)
    assert _until(fake, "done")[-1]["allow_pickle"] is True


def test_exit_is_reported_with_status_and_stderr(fake: worker_client.WorkerClient) -> None:
    fake.generate("j2", {"prompt": "crash", "out": "/nowhere"})
    seen = _until(fake, worker_client.EXITED)
    assert seen[-1]["returncode"] == 3
    assert "the fake worker crashed" in fake.stderr_tail()
    assert not fake.alive
    with pytest.raises(worker_client.WorkerError, match="exited with status 3"):
        fake.cancel("j2")


def test_shutdown_ends_the_process(fake: worker_client.WorkerClient) -> None:
    _until(fake, "ready")
    fake.shutdown(timeout=5)
    assert fake.returncode == 0


def test_missing_python_is_a_clear_error(tmp_path: Path) -> None:
    client = worker_client.WorkerClient(tmp_path / "no-python")
    with pytest.raises(worker_client.WorkerError, match="python not found: .*no-python"):
        client.start()


def test_unknown_request_type_is_refused(fake: worker_client.WorkerClient) -> None:
    with pytest.raises(ValueError, match="not a request type"):
        fake.send("done", id="x")


def test_worker_runs_from_the_folder_containing_backend(fake: worker_client.WorkerClient) -> None:
    assert Path(fake.cwd) == backend_paths.backend_root()
    assert (Path(fake.cwd) / "backend" / "protocol.py").is_file()
    assert "PYTHONPATH" not in fake.env and fake.env["PYTHONUNBUFFERED"] == "1"
