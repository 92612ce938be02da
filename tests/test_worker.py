"""backend/worker.py: the JSON-lines protocol through a real ``python -m backend serve``."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backend.protocol import (
    MAX_LINE_BYTES,
    MAX_PROMPT_CHARS,
    REPLIES,
    decode_message,
    encode_message,
    validate_job,
)

REPO = Path(__file__).resolve().parent.parent
TERMINAL = {"done", "error", "cancelled"}


class WorkerProcess:
    """A ``python -m backend serve`` subprocess with its replies collected on a thread."""

    def __init__(self, env: dict[str, str], stderr_path: Path):
        self.stderr_file = open(stderr_path, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backend", "serve"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr_file,
            text=True,
            bufsize=1,
        )
        self.replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.stray_lines: list[str] = []  # stdout lines that are not protocol messages
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                message = decode_message(line)
            except ValueError:
                self.stray_lines.append(line)
                continue
            if message["type"] not in REPLIES:
                self.stray_lines.append(line)
            self.replies.put(message)
        self.replies.put(None)

    def send(self, kind: str, /, **payload: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(encode_message(kind, **payload) + "\n")
        self.proc.stdin.flush()

    def send_raw(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def send_bytes(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.flush()
        self.proc.stdin.buffer.write(data)
        self.proc.stdin.buffer.flush()

    def next(self, timeout: float = 120) -> dict[str, Any]:
        try:
            message = self.replies.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no reply from the worker in {timeout} s")
        if message is None:
            pytest.fail(f"the worker exited (code {self.proc.poll()})")
        self.seen.append(message)
        return message

    def until_terminal(self, job_id: str, timeout: float = 120) -> list[dict[str, Any]]:
        """Replies up to and including the terminal one for ``job_id``."""
        out = []
        while True:
            message = self.next(timeout)
            out.append(message)
            if message.get("id") == job_id and message["type"] in TERMINAL:
                return out

    def close(self) -> int:
        if self.proc.poll() is None:
            try:
                self.send("shutdown")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr_file.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def worker(backend_env: dict, tiny_models: dict, tmp_path_factory) -> Iterator[WorkerProcess]:
    w = WorkerProcess(backend_env, tmp_path_factory.mktemp("worker") / "stderr.txt")
    ready = w.next()
    assert ready["type"] == "ready" and ready["pid"] == w.proc.pid and ready["version"]
    yield w
    w.close()


def job(out: Path, **fields: Any) -> dict[str, Any]:
    return {
        "prompt": "a cat",
        "out": str(out),
        "model": "builtin:tiny",
        "frames": 2,
        "width": 64,
        "height": 64,
        "steps": 2,
        "device": "cpu",
        "write_mp4": False,
        **fields,
    }


def of_type(messages: list[dict], kind: str) -> list[dict]:
    return [m for m in messages if m["type"] == kind]


def test_generate_reports_progress_previews_and_done(worker: WorkerProcess, tmp_path: Path) -> None:
    out = tmp_path / "out"
    worker.send("generate", id="j1", job=job(out, frames=3))
    replies = worker.until_terminal("j1")
    assert {m.get("id") for m in replies} == {"j1"}
    assert replies[0]["type"] == "accepted" and replies[-1]["type"] == "done"

    progress = of_type(replies, "progress")
    assert progress
    for m in progress:
        assert set(m) >= {"step", "total", "frames_done", "frames_total", "fraction", "stage"}
        assert m["total"] == 2 and m["frames_total"] == 3 and 0 <= m["fraction"] <= 1
    assert [m["fraction"] for m in progress] == sorted(m["fraction"] for m in progress)
    assert progress[-1]["fraction"] == 1.0 and progress[-1]["frames_done"] == 3

    # Finished frames, in order; on a slow machine frame 1's denoising previews (due every
    # DENOISING_PREVIEW_SECONDS) may come before them.
    previews = of_type(replies, "preview")
    forming = [m for m in previews if Path(m["path"]).name.startswith(".preview-")]
    assert all(m["frame"] == 1 for m in forming)
    finished = [m for m in previews if m not in forming]
    assert [m["frame"] for m in finished] == [1, 2, 3]  # 1-based, like the frame files
    assert all(Path(m["path"]).name == f"frame_0000{m['frame']}.png" for m in finished)

    done = replies[-1]
    assert done["out"] == str(out.resolve())
    assert done["frames"] == [str(out.resolve() / f"frame_0000{i}.png") for i in (1, 2, 3)]
    assert all(Path(p).is_file() for p in done["frames"])
    assert validate_job(json.loads((out / "job.json").read_text())).frames == 3


def test_bad_job_is_an_error_naming_the_field_and_the_worker_lives_on(
    worker: WorkerProcess, tmp_path: Path
) -> None:
    worker.send("generate", id="bad", job=job(tmp_path / "x", width=100))
    [error] = worker.until_terminal("bad")
    assert error["type"] == "error" and error["kind"] == "JobError"
    assert error["message"].startswith("width: ") and "100" in error["message"]
    assert not (tmp_path / "x").exists()

    worker.send_raw("this is not json\n")
    garbage = worker.next()
    assert garbage["type"] == "error" and garbage["kind"] == "ProtocolError"

    worker.send("generate", id="good", job=job(tmp_path / "y"))
    assert worker.until_terminal("good")[-1]["type"] == "done"


HOSTILE_LINES = {
    # A RecursionError used to kill the reader thread: no reply, shutdown and EOF ignored.
    "nested": b'{"type":"cancel","id":' + b"[" * 1000 + b"]" * 1000 + b"}\n",
    "deeper": b'{"type":"cancel","id":' + b"[" * 200_000 + b"]" * 200_000 + b"}\n",
    "not UTF-8": b'{"type":"shutdown","note":"\xff\xfe"}\n',
    "not an object": b'"shutdown"\n',
    "over the line limit": b'{"type":"cancel","id":"' + b"x" * (3 * MAX_LINE_BYTES) + b'"}\n',
    "bad id": b'{"type":"cancel","id":{"a":[1]}}\n',
}


def test_any_line_gets_an_error_reply_and_the_worker_keeps_serving(
    worker: WorkerProcess, tmp_path: Path
) -> None:
    for name, line in HOSTILE_LINES.items():
        worker.send_bytes(line)
        reply = worker.next(timeout=30)
        assert reply["type"] == "error" and reply["kind"] == "ProtocolError", name
        assert reply["id"] is None and len(reply["message"]) < 400, name
    assert "longer than" in reply["message"] or "id" in reply["message"]
    worker.send("generate", id="after", job=job(tmp_path / "out"))
    assert worker.until_terminal("after")[-1]["type"] == "done"


def test_big_bad_values_are_refused_with_short_replies(
    worker: WorkerProcess, tmp_path: Path
) -> None:
    """A 10.5 MB reply echoed a bad value; a 10 MB prompt delayed a cancel by 44 s."""
    worker.send("generate", id="prompt", job=job(tmp_path / "a", prompt="a" * 900_000))
    [error] = worker.until_terminal("prompt", timeout=30)
    assert error["kind"] == "JobError"
    assert error["message"].startswith(f"prompt: must be at most {MAX_PROMPT_CHARS} characters")
    assert len(error["message"]) < 300
    worker.send("generate", id="field", job=job(tmp_path / "b", colour="red" * 300_000))
    [error] = worker.until_terminal("field", timeout=30)
    assert error["message"].startswith("colour: unknown field") and len(error["message"]) < 300
    assert list(tmp_path.iterdir()) == []


def test_only_the_requests_allow_pickle_loads_pickled_weights(
    worker: WorkerProcess, tmp_path: Path, pickled_controlnet: Path
) -> None:
    """The add-on sets the request's allow_pickle from its preference; a job's own field
    (a job.json anyone could write) enables nothing."""
    import numpy as np

    from backend.video_io import write_png

    control = tmp_path / "control.png"
    write_png(control, np.full((64, 64, 3), 200, np.uint8))
    spec = job(
        tmp_path / "asked",
        mode="controlnet",
        allow_pickle=True,
        controlnets=[{"model": str(pickled_controlnet), "control": str(control)}],
    )
    worker.send("generate", id="asked", job=spec)
    error = worker.until_terminal("asked")[-1]
    assert error["type"] == "error" and error["kind"] == "ModelLoadError"
    assert "--allow-pickle" in error["message"]
    worker.send("generate", id="bad", job=spec, allow_pickle="yes")
    error = worker.until_terminal("bad")[-1]
    assert error["kind"] == "JobError" and error["message"].startswith("allow_pickle: ")
    spec["out"] = str(tmp_path / "allowed")
    worker.send("generate", id="allowed", job=spec, allow_pickle=True)
    assert worker.until_terminal("allowed")[-1]["type"] == "done"


def test_runtime_failure_reports_kind_message_and_traceback(
    worker: WorkerProcess, tmp_path: Path
) -> None:
    spec = job(tmp_path / "out", mode="pix2pix", model="builtin:tiny-pix2pix")
    spec["video"] = str(tmp_path / "no-such-video")
    worker.send("generate", id="fail", job=spec)
    replies = worker.until_terminal("fail")
    error = replies[-1]
    assert error["type"] == "error" and error["kind"] == "VideoInputError"
    assert "no-such-video" in error["message"] and "Traceback" in error["traceback"]
    assert list(tmp_path.iterdir()) == []


def test_cancel_stops_the_job_and_leaves_no_output(worker: WorkerProcess, tmp_path: Path) -> None:
    out = tmp_path / "out"
    worker.send("generate", id="long", job=job(out, frames=8, steps=50))
    assert worker.next()["type"] == "accepted"
    worker.send("cancel", id="long")
    replies = worker.until_terminal("long")
    assert replies[-1]["type"] == "cancelled"
    assert not of_type(replies, "preview")  # stopped while denoising
    assert list(tmp_path.iterdir()) == []


def test_cancel_of_a_queued_job(worker: WorkerProcess, tmp_path: Path) -> None:
    """A cancel for a job that has not started yet is kept; the running job goes on."""
    worker.send("generate", id="first", job=job(tmp_path / "first", frames=4, steps=10))
    worker.send("generate", id="queued", job=job(tmp_path / "queued"))
    worker.send("cancel", id="queued")
    first = worker.until_terminal("first")
    assert first[-1]["type"] == "done"
    queued = worker.until_terminal("queued")
    assert [m["type"] for m in queued] == ["cancelled"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first"]


def test_stdout_carries_only_protocol_lines(worker: WorkerProcess, tmp_path: Path) -> None:
    worker.send("generate", id="last", job=job(tmp_path / "out"))
    worker.until_terminal("last")
    assert worker.stray_lines == []
    assert all(m["type"] in REPLIES for m in worker.seen)


def test_stdout_guard_sends_stray_output_to_stderr(backend_env: dict) -> None:
    """Once the worker claims stdout, prints and raw writes to fd 1 (a library's C code)
    land on stderr; only protocol lines reach the real stdout."""
    script = (
        "import os, sys\n"
        "from backend.worker import ProtocolWriter, _claim_stdout\n"
        "writer = ProtocolWriter(_claim_stdout())\n"
        "print('stray print'); sys.stdout.flush()\n"
        "os.write(1, b'stray fd write\\n')\n"
        "writer.send('ready')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=backend_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert [decode_message(line)["type"] for line in proc.stdout.splitlines()] == ["ready"]
    assert "stray print" in proc.stderr and "stray fd write" in proc.stderr


def test_shutdown_ends_the_worker(backend_env: dict, tmp_path: Path) -> None:
    w = WorkerProcess(backend_env, tmp_path / "stderr.txt")
    assert w.next()["type"] == "ready"
    w.send("shutdown")
    assert w.proc.wait(timeout=60) == 0
    assert w.close() == 0
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr


def test_a_cancel_for_a_finished_job_does_not_cancel_a_later_one(
    worker: WorkerProcess, tmp_path: Path
) -> None:
    """Cancels only reach running or queued jobs; a stale id is not remembered."""
    worker.send("generate", id="again", job=job(tmp_path / "one"))
    assert worker.until_terminal("again")[-1]["type"] == "done"
    worker.send("cancel", id="again")
    worker.send("generate", id="again", job=job(tmp_path / "two"))
    assert worker.until_terminal("again")[-1]["type"] == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


def test_shutdown_and_eof_still_work_after_a_hostile_line(
    backend_env: dict, tmp_path: Path
) -> None:
    for ending in ("shutdown", "eof"):
        w = WorkerProcess(backend_env, tmp_path / f"stderr-{ending}.txt")
        assert w.next()["type"] == "ready"
        w.send_bytes(HOSTILE_LINES["deeper"])
        assert w.next(timeout=30)["kind"] == "ProtocolError"
        if ending == "shutdown":
            w.send("shutdown")
        else:
            w.proc.stdin.close()
        assert w.proc.wait(timeout=60) == 0
        w.close()


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_mid_job_leaves_no_partial_output(
    backend_env: dict, tmp_path: Path, signame: str
) -> None:
    """A worker stopped with SIGTERM or SIGHUP (SIGHUP: failed before, the folder stayed)
    while denoising removes its staging folder."""
    import signal

    w = WorkerProcess(backend_env, tmp_path / "stderr.txt")
    results = tmp_path / "results"
    results.mkdir()
    try:
        assert w.next()["type"] == "ready"
        w.send("generate", id="t", job=job(results / "out", frames=8, steps=50))
        assert w.next()["type"] == "accepted"
        assert w.next()["type"] == "progress"  # denoising has begun: a staging folder exists
        w.proc.send_signal(getattr(signal, signame))
        assert w.proc.wait(timeout=60) == 128 + getattr(signal, signame)
    finally:
        w.close()
    assert list(results.iterdir()) == []
