"""backend/service/worker.py: the JSON-lines protocol through a real ``python -m backend serve``."""

from __future__ import annotations

import io
import json
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from backend import __version__
from backend.protocol import (
    MAX_LINE_BYTES,
    MAX_MESSAGE_CHARS,
    MAX_PROMPT_CHARS,
    MAX_TRACEBACK_CHARS,
    REPLIES,
    decode_message,
    encode_message,
    validate_job,
)

REPO = Path(__file__).resolve().parent.parent
TERMINAL = {"done", "error", "cancelled"}


def sort_protocol_line(line: bytes | str, replies: queue.Queue, stray: list) -> None:
    """One line of the protocol stream: a message goes to ``replies``; a line that is no
    message, or not a reply, is also kept in ``stray`` (the stream must hold replies only)."""
    try:
        message = decode_message(line)
    except ValueError:
        stray.append(line)
        return
    if message["type"] not in REPLIES:
        stray.append(line)
    replies.put(message)


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
            sort_protocol_line(line, self.replies, self.stray_lines)
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


def batch(*requests: tuple[str, dict[str, Any]]) -> str:
    """Request lines to send in one write: no pause of the sender falls between them."""
    return "".join(encode_message(kind, **payload) + "\n" for kind, payload in requests)


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
    # The first job of a fresh worker (this test run alone) also waits for the torch import.
    [error] = worker.until_terminal("prompt", timeout=300)
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

    from backend.media.video_io import write_png

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
    # Half a minute unless cancelled: still running when the cancel lands on a busy machine.
    worker.send("generate", id="long", job=job(out, frames=8, steps=500))
    assert worker.next()["type"] == "accepted"
    worker.send("cancel", id="long")
    replies = worker.until_terminal("long")
    assert replies[-1]["type"] == "cancelled"
    assert not of_type(replies, "preview")  # stopped while denoising
    assert list(tmp_path.iterdir()) == []


def test_cancel_of_a_queued_job(worker: WorkerProcess, tmp_path: Path) -> None:
    """A cancel for a job that has not started yet is kept; the running job goes on."""
    # One write: the cancel must reach the worker while "first" runs, however long this
    # process is held up between two sends on a busy machine.
    worker.send_raw(
        batch(
            ("generate", {"id": "first", "job": job(tmp_path / "first", frames=4, steps=40)}),
            ("generate", {"id": "queued", "job": job(tmp_path / "queued")}),
            ("cancel", {"id": "queued"}),
        )
    )
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
        "from backend.service.worker import ProtocolWriter, _claim_stdout\n"
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
        # Half a minute unless stopped: still denoising when the signal lands on a busy machine.
        w.send("generate", id="t", job=job(results / "out", frames=8, steps=500))
        assert w.next()["type"] == "accepted"
        assert w.next()["type"] == "progress"  # denoising has begun: a staging folder exists
        w.proc.send_signal(getattr(signal, signame))
        assert w.proc.wait(timeout=60) == 128 + getattr(signal, signame)
    finally:
        w.close()
    assert list(results.iterdir()) == []


# ------------------------------------------------------------------ the loop in this process
#
# The tests above run a real worker process, as the add-on does. The ones below run
# ``serve`` on a thread of the test process: mutation testing (docs/mutation.md) maps tests
# to the functions they call inside its own process only, so the subprocess tests measure
# nothing of backend/service/worker.py there. Each test starts its own worker (a fresh model cache
# and request state) with the tiny models: a few seconds at most.


class InProcessWorker:
    """``backend.service.worker.serve`` on a thread of this process, laid out as a worker process.

    fd 1 and ``sys.stdout`` lead to a pipe read here (the protocol stream the worker claims
    at start), fd 2 and ``sys.stderr`` to ``stderr_path``; requests go in through a pipe
    read as text, like the real stdin. Create it inside a test, not in a fixture: pytest
    points fds 1 and 2 at its capture files again between a test's phases.
    """

    def __init__(self, stderr_path: Path, **serve_args: Any):
        from backend.service.worker import serve

        self.stderr_path = stderr_path
        self.stray_lines: list[bytes] = []  # protocol stream lines that are not replies
        self.replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.rest: list[dict[str, Any]] = []  # replies left unread at close()
        self.exit_code: int | None = None
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._saved_streams = (sys.stdout, sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved_fds = {fd: os.dup(fd) for fd in (1, 2)}
        out_read, out_write = os.pipe()
        os.dup2(out_write, 1)
        os.close(out_write)
        err = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(err, 2)
        os.close(err)
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
        in_read, in_write = os.pipe()
        self.stdin = os.fdopen(in_write, "wb", buffering=0)
        requests = open(in_read, encoding="utf-8")  # noqa: SIM115 (the worker reads it to EOF)
        self._reader = threading.Thread(target=self._read, args=(out_read,), daemon=True)
        self._reader.start()

        def run() -> None:
            try:
                self.exit_code = serve(stdin=requests, **serve_args)
            except BaseException as exc:  # noqa: BLE001 (reported by next())
                self.failure = exc

        self.thread = threading.Thread(target=run, daemon=True, name="in-process-serve")
        self.thread.start()

    def _read(self, fd: int) -> None:
        """Collect the protocol stream's lines until close() (the worker never closes it)."""
        pending = b""
        while True:
            ready, _, _ = select.select([fd], [], [], 0.05)
            if not ready:
                if self._stop.is_set():
                    break
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                sort_protocol_line(line, self.replies, self.stray_lines)
        if pending:
            self.stray_lines.append(pending)
        os.close(fd)
        self.replies.put(None)

    def send(self, kind: str, /, **payload: Any) -> None:
        self.stdin.write((encode_message(kind, **payload) + "\n").encode())

    def send_bytes(self, data: bytes) -> None:
        self.stdin.write(data)

    def next(self, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        ended_at = None
        while time.monotonic() < deadline:
            try:
                message = self.replies.get(timeout=0.05)
            except queue.Empty:
                if self.thread.is_alive():
                    continue
                ended_at = ended_at or time.monotonic()
                # Its last lines have been read by now, even on a busy machine.
                if time.monotonic() - ended_at > 5:
                    pytest.fail(f"serve ended ({self.exit_code!r}, {self.failure!r})")
                continue
            if message is None:
                pytest.fail("the protocol stream was closed")
            return message
        pytest.fail(f"no reply from the worker in {timeout} s")

    def until_terminal(self, job_id: str, timeout: float = 30) -> list[dict[str, Any]]:
        """Replies up to and including the terminal one for ``job_id``."""
        out = []
        while True:
            out.append(self.next(timeout))
            if out[-1].get("id") == job_id and out[-1]["type"] in TERMINAL:
                return out

    def wait(self, timeout: float = 30) -> int | None:
        """The worker's exit status once serve has returned."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "serve did not return"
        assert self.failure is None, self.failure
        return self.exit_code

    def close(self) -> None:
        """End the worker (end of input), restore this process's stdout and stderr and keep
        the replies not read yet in ``rest``."""
        try:
            if not self.stdin.closed:
                self.stdin.close()
            self.thread.join(30)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, saved in self._saved_fds.items():
                os.dup2(saved, fd)
                os.close(saved)
            sys.stdout, sys.stderr = self._saved_streams
            self._stop.set()
            self._reader.join(10)
        while not self.replies.empty():
            message = self.replies.get()
            if message is not None:
                self.rest.append(message)
        assert not self.thread.is_alive(), "serve did not return at the end of its input"

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")


@contextmanager
def in_process(tmp_path: Path, **serve_args: Any) -> Iterator[InProcessWorker]:
    """A started in-process worker whose ``ready`` has been read; closed on leaving."""
    w = InProcessWorker(tmp_path / f"stderr-{time.monotonic_ns()}.txt", **serve_args)
    try:
        ready = w.next()
        assert ready == {"type": "ready", "version": __version__, "pid": os.getpid()}
        yield w
    finally:
        w.close()


def long_job(out: Path) -> dict[str, Any]:
    """A job that runs for seconds (the tiny model does ~400 evaluations a second)."""
    return job(out, frames=8, steps=200)


def cached_model(cache: Path, model: str, files: dict[str, bytes]) -> Path:
    """Put hub model ``model`` into the hub cache ``cache`` as huggingface_hub lays it out
    (blobs, a snapshot of links to them, refs/main); its snapshot folder."""
    import hashlib

    repo = cache / ("models--" + model.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_bounded_lines_refuse_only_lines_over_the_limit() -> None:
    from backend.service.worker import TOO_LONG, bounded_lines

    big = b"y" * 200_000  # skipped in several 64 KiB pieces
    data = b"a\n" + b"x" * 8 + b"\n" + b"z" * 9 + b"\n" + big + b"\n" + b"after\n" + b"w" * 8
    assert list(bounded_lines(io.BytesIO(data), limit=8)) == [
        b"a\n",
        b"xxxxxxxx\n",  # 8 bytes and the newline: at the limit
        TOO_LONG,
        TOO_LONG,
        b"after\n",  # read whole after the long lines
        b"wwwwwwww",  # a last line without newline, at the limit
    ]
    assert list(bounded_lines(io.BytesIO(b"ok\n" + b"q" * 100), limit=8)) == [b"ok\n", TOO_LONG]


def test_protocol_writer_clips_error_replies_and_leaves_others_whole() -> None:
    from backend.service.worker import ProtocolWriter

    stream = io.StringIO()
    writer = ProtocolWriter(stream)
    long_message = "m" * (MAX_MESSAGE_CHARS + 10)
    writer.send("error", id="e", kind="X", message=long_message, traceback="t" * 20_005)
    writer.send("error", id=None, kind="ProtocolError")
    writer.send("progress", id="p", stage=long_message)
    lines = stream.getvalue().split("\n")
    assert lines[-1] == "" and len(lines) == 4  # one line per message, each ended
    first, second, third = map(json.loads, lines[:3])
    assert first == {
        "type": "error",
        "id": "e",
        "kind": "X",
        "message": "m" * MAX_MESSAGE_CHARS + " ... [10 more characters]",
        "traceback": "t" * MAX_TRACEBACK_CHARS + " ... [5 more characters]",
    }
    assert second == {
        "type": "error",
        "id": None,
        "kind": "ProtocolError",
        "message": "",
        "traceback": "",
    }
    assert third == {"type": "progress", "id": "p", "stage": long_message}


def test_in_process_job_replies(tiny_models: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with in_process(tmp_path) as w:
        w.send("generate", id="j1", job=job(out, frames=3))
        replies = w.until_terminal("j1")
    assert replies[0] == {"type": "accepted", "id": "j1"}
    progress = of_type(replies, "progress")
    fields = {"type", "id", "step", "total", "frames_done", "frames_total", "fraction", "stage"}
    for m in progress:
        assert set(m) == fields and m["id"] == "j1", m
        assert m["total"] == 2 and m["frames_total"] == 3, m
        assert m["fraction"] == round(m["fraction"], 4), m  # rounded for the add-on
        assert type(m["step"]) is int and 1 <= m["step"] <= m["total"], m
    fractions = [m["fraction"] for m in progress]
    assert fractions == sorted(fractions) and 0 < fractions[0] < 0.9 < fractions[-1] == 1.0
    assert any(len(str(f)) == 6 for f in fractions)  # one has 4 decimals (cut from more)
    denoising = [m for m in progress if m["stage"] == "denoising"]
    assert denoising and all(m["frames_done"] == 0 for m in denoising)
    assert progress[-1]["stage"] == "decoding" and progress[-1]["frames_done"] == 3
    assert denoising[-1]["step"] == 2 and progress[-1]["step"] == 2

    previews = [m for m in of_type(replies, "preview") if "frame_" in m["path"]]
    assert [(m["id"], m["frame"], Path(m["path"]).name) for m in previews] == [
        ("j1", i, f"frame_0000{i}.png") for i in (1, 2, 3)
    ]
    run = json.loads((out / "run.json").read_text())
    assert replies[-1] == {
        "type": "done",
        "id": "j1",
        "out": str(out.resolve()),
        "frames": [str(out.resolve() / f"frame_0000{i}.png") for i in (1, 2, 3)],
        "seconds": run["seconds"],  # rounded to ms as there
    }


def test_in_process_refusals_and_failures_name_what_went_wrong(
    tiny_models: dict, tmp_path: Path, pickled_controlnet: Path
) -> None:
    import numpy as np

    from backend.media.video_io import write_png

    control = tmp_path / "control.png"
    write_png(control, np.full((64, 64, 3), 200, np.uint8))
    pickled = job(
        tmp_path / "pickled",
        mode="controlnet",
        controlnets=[{"model": str(pickled_controlnet), "control": str(control)}],
    )
    pix2pix = job(tmp_path / "p2p", mode="pix2pix", model="builtin:tiny-pix2pix")
    pix2pix["video"] = str(tmp_path / "no-such-video")
    with in_process(tmp_path) as w:
        w.send("generate", id="w", job=job(tmp_path / "w", width=100))
        [error] = w.until_terminal("w")
        assert error["type"] == "error" and error["id"] == "w" and error["kind"] == "JobError"
        assert error["message"].startswith("width: ") and "100" in error["message"]
        assert error["traceback"] == ""

        w.send("generate", id="p", job=pickled, allow_pickle="yes")
        [error] = w.until_terminal("p")
        assert error["message"] == "allow_pickle: expected bool, got 'yes'"
        w.send("generate", id="p", job=pickled)  # the switch is off unless the request sets it
        error = w.until_terminal("p")[-1]
        assert error["kind"] == "ModelLoadError" and "--allow-pickle" in error["message"]
        w.send("generate", id="p", job=pickled, allow_pickle=True)
        assert w.until_terminal("p")[-1]["type"] == "done"

        w.send("generate", id="fail", job=pix2pix)
        error = w.until_terminal("fail")[-1]
        assert error["type"] == "error" and error["kind"] == "VideoInputError"
        assert "no-such-video" in error["message"]
        assert error["traceback"].startswith("Traceback (most recent call last)")
        assert "VideoInputError" in error["traceback"]

        w.send("done", id="z")  # a reply's type is no request
        assert w.next() == {
            "type": "error",
            "id": "z",
            "kind": "ProtocolError",
            "message": "unexpected request 'done'",
            "traceback": "",
        }

        # A refused job leaves no trace in the queue's bookkeeping: neither a later cancel
        # of its id nor one sent while it waited cancels the next job of that id.
        w.send("generate", id="x", job=job(tmp_path / "x", height=7))
        assert w.until_terminal("x")[-1]["kind"] == "JobError"
        w.send("cancel", id="x")
        w.send("generate", id="x", job=job(tmp_path / "x"))
        assert w.until_terminal("x")[-1]["type"] == "done"
        w.send("generate", id="first", job=long_job(tmp_path / "first"))
        w.send("generate", id="y", job=job(tmp_path / "y", height=7))
        w.send("cancel", id="y")  # while y waits behind the running job
        w.send("cancel", id="first")
        assert w.until_terminal("first")[-1]["type"] == "cancelled"
        assert w.until_terminal("y")[-1]["kind"] == "JobError"
        w.send("generate", id="y", job=job(tmp_path / "y"))
        assert w.until_terminal("y")[-1]["type"] == "done"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["pickled", "x", "y"]


def started(w: InProcessWorker, job_id: str) -> None:
    """Wait until job ``job_id`` is accepted and denoising."""
    assert w.next() == {"type": "accepted", "id": job_id}
    assert w.next()["type"] == "progress"


def test_in_process_cancel_reaches_the_running_job_only(tiny_models: dict, tmp_path: Path) -> None:
    with in_process(tmp_path) as w:
        w.send("generate", id="a", job=long_job(tmp_path / "a"))
        started(w, "a")
        w.send("cancel", id="a")
        replies = w.until_terminal("a")
        assert replies[-1] == {"type": "cancelled", "id": "a"}
        assert not of_type(replies, "preview")  # stopped while denoising

        w.send("generate", id="b", job=long_job(tmp_path / "b"))
        started(w, "b")
        w.send("cancel")  # no id: whatever runs
        assert w.until_terminal("b")[-1] == {"type": "cancelled", "id": "b"}

        w.send("generate", id="c", job=job(tmp_path / "c", frames=8, steps=50))
        started(w, "c")
        w.send("cancel", id="a")  # finished jobs: nothing to stop
        w.send("cancel", id="unknown")
        assert w.until_terminal("c")[-1]["type"] == "done"
        w.send("generate", id="a", job=job(tmp_path / "a"))  # the cancel of old "a" is gone
        assert w.until_terminal("a")[-1]["type"] == "done"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["a", "c"]


def test_in_process_cancel_of_queued_requests(tiny_models: dict, tmp_path: Path) -> None:
    """A cancel for a request still in the queue is kept for it; the running job goes on,
    and the same ids later run as usual."""
    with in_process(tmp_path) as w:
        # One write: the cancels must reach the worker while "first" runs, however long
        # this thread is held up between two sends on a busy machine.
        first = job(tmp_path / "first", frames=8, steps=20)
        w.send_bytes(
            batch(
                ("generate", {"id": "first", "job": first}),
                ("generate", {"id": "queued", "job": job(tmp_path / "queued")}),
                ("fetch_model", {"id": "fq", "model": "test/absent"}),
                ("cancel", {"id": "queued"}),
                ("cancel", {"id": "fq"}),
            ).encode()
        )
        replies = w.until_terminal("fq")
        assert [
            (m["type"], m["id"]) for m in replies if m["type"] not in ("progress", "preview")
        ] == [
            ("accepted", "first"),
            ("done", "first"),
            ("cancelled", "queued"),
            ("cancelled", "fq"),
        ]
        w.send("generate", id="queued", job=job(tmp_path / "queued"))
        assert w.until_terminal("queued")[-1]["type"] == "done"
        w.send("fetch_model", id="fq", model="test/absent")
        error = w.until_terminal("fq")[-1]
        assert error["kind"] == "HubError" and "'test/absent'" in error["message"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["first", "queued"]


def test_in_process_bad_lines_get_an_error_naming_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import backend.service.worker

    real = backend.service.worker.decode_message

    def decode(line: bytes) -> dict[str, Any]:
        if b"boom" in line:
            raise RuntimeError("boom")
        return real(line)

    monkeypatch.setattr(backend.service.worker, "decode_message", decode)

    def protocol_error(message: str) -> dict[str, Any]:
        return {
            "type": "error",
            "id": None,
            "kind": "ProtocolError",
            "message": message,
            "traceback": "",
        }

    with in_process(tmp_path) as w:
        w.send_bytes(b"this is not json\n")
        error = w.next()
        assert error == protocol_error(error["message"]) and "'this is not json" in error["message"]
        w.send_bytes(b"\n  \n")  # blank lines: no reply
        w.send_bytes(b'{"type":"cancel","id":{"a":[1]}}\n')
        assert w.next() == protocol_error("message id must be a string, got {'a': [1]}")
        w.send_bytes(b'{"type":"cancel","id":"' + b"x" * MAX_LINE_BYTES + b'"}\n')
        assert w.next() == protocol_error(
            f"request line longer than {MAX_LINE_BYTES} bytes refused (skipped unread)"
        )
        w.send_bytes(b'{"type":"boom"}\n')  # a line whose handling fails: the reader goes on
        assert w.next() == protocol_error("RuntimeError: boom")
        w.send("list_models", id="after")
        assert w.next()["type"] == "models"


def test_in_process_stray_output_goes_to_stderr_not_the_protocol(
    tiny_models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once serving, what a library prints (Python's print, C code writing to fd 1) lands on
    stderr: the protocol stream stays JSON lines. Without the guard these lines would be
    stray lines among the replies."""
    import backend.service.runner

    real = backend.service.runner.run_job

    def noisy(*args: Any, **kwargs: Any) -> Any:
        print("stray print")
        sys.stdout.flush()
        os.write(1, b"stray fd write\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(backend.service.runner, "run_job", noisy)
    with in_process(tmp_path) as w:
        w.send("generate", id="n", job=job(tmp_path / "out"))
        assert w.until_terminal("n")[-1]["type"] == "done"
    assert w.stray_lines == []
    stderr = w.stderr()
    assert "stray print\n" in stderr and "stray fd write\n" in stderr


def test_in_process_shutdown_and_end_of_input_stop_the_running_job(
    tiny_models: dict, tmp_path: Path
) -> None:
    for ending in ("shutdown", "eof"):
        with in_process(tmp_path) as w:
            w.send("generate", id="s", job=long_job(tmp_path / ending))
            started(w, "s")
            if ending == "shutdown":
                w.send("shutdown")
                w.send_bytes(b"not json\n")  # after shutdown: not read
            else:
                w.stdin.close()
            replies = w.until_terminal("s")
            assert replies[-1] == {"type": "cancelled", "id": "s"}, ending
            assert w.wait() == 0
        assert w.rest == [] and of_type(replies, "error") == [], ending
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []  # no output of either job


def test_in_process_shutdown_drops_the_requests_queued_before_it(
    tiny_models: dict, tmp_path: Path
) -> None:
    """Shutdown (Blender closing) cancels the running job and the queued ones never start:
    they used to run in full, one after another, before the worker exited."""
    with in_process(tmp_path) as w:
        w.send("generate", id="running", job=long_job(tmp_path / "running"))
        started(w, "running")
        w.send("generate", id="queued", job=job(tmp_path / "queued"))
        w.send("fetch_model", id="fq", model="test/absent")
        w.send("shutdown")
        replies = w.until_terminal("running")
        assert replies[-1] == {"type": "cancelled", "id": "running"}
        assert w.wait() == 0
    later = [m for m in w.rest if m.get("id") in ("queued", "fq")]
    assert all(m["type"] == "cancelled" for m in later), later  # never accepted, never run
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []  # no output of any job


def test_in_process_model_cache_requests(
    tiny_models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """list_models (answered at once, even while a job runs), fetch_model and remove_model
    against a hub cache on disk; offline, as every test is."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    files = {"config.json": b"{}", "diffusion_pytorch_model.safetensors": b"w" * 1000}
    snapshot = cached_model(cache, "test/small", files)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with in_process(tmp_path) as w:
        w.send("generate", id="long", job=long_job(tmp_path / "long"))
        started(w, "long")
        w.send("list_models", id="l1")
        replies = []
        while not replies or replies[-1]["type"] != "models":
            replies.append(w.next())
        assert [m["type"] for m in replies[:-1]] == ["progress"] * (len(replies) - 1)
        listed = replies[-1]
        assert set(listed) == {"type", "id", "cache_dir", "models"}
        assert listed["cache_dir"] == str(cache)
        assert [(m["model"], m["size"]) for m in listed["models"]] == [("test/small", 1002)]
        w.send("cancel", id="long")
        assert w.until_terminal("long")[-1]["type"] == "cancelled"

        w.send("fetch_model", id="f1", model="test/small")
        assert w.next() == {
            "type": "fetched",
            "id": "f1",
            "model": "test/small",
            "path": str(snapshot),
        }
        w.send("fetch_model", id="f2", model="test/absent")
        error = w.next()
        assert error["type"] == "error" and error["id"] == "f2" and error["kind"] == "HubError"
        assert "'test/absent'" in error["message"] and "HF_HUB_OFFLINE" in error["message"]
        assert error["traceback"].startswith("Traceback (most recent call last)")
        w.send("cancel", id="f1")  # f1 has finished (f2 ran since): nothing to cancel or keep
        w.send("fetch_model", id="f1", model="test/small")
        assert w.next()["type"] == "fetched"
        for bad, reason in (
            ("small", "a hub id is owner/name, or owner/name/path/file.safetensors for one "
             "file of a repo"),
            (7, "a hub id is owner/name, or owner/name/path/file.safetensors for one file of "
             "a repo"),
            ("a/b/c", "a file of a hub repo must be weights ending in .safetensors (or, with "
             "pickled weights allowed, .ckpt, .bin, .pt, .pth), got 'c'"),
        ):  # fmt: skip
            w.send("fetch_model", id="f3", model=bad)
            error = w.next()
            assert error["id"] == "f3" and error["kind"] == "ValueError", bad
            assert error["message"] == f"model: expected a hub id, got {bad!r}: {reason}"
        w.send("remove_model", id="r1", model="a/b/c")
        assert w.next()["message"] == "model: expected a hub id (owner/name), got 'a/b/c'"

        w.send("remove_model", id="r1", model="test/small")
        assert w.next() == {"type": "removed", "id": "r1", "model": "test/small", "freed": 1002}
        assert not (cache / "models--test--small").exists()
        w.send("remove_model", id="r2", model="test/small")
        error = w.next()
        assert error["kind"] == "HubError" and "'test/small'" in error["message"]
        w.send("list_models", id="l2")
        assert w.next() == {"type": "models", "id": "l2", "cache_dir": str(cache), "models": []}

        # A cache that cannot be read is an error reply, and the worker goes on.
        (tmp_path / "not-a-folder").write_text("x")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "not-a-folder"))
        w.send("list_models", id="l3")
        error = w.next()
        assert error["type"] == "error" and error["id"] == "l3" and error["kind"] == "ValueError"
        assert "not-a-folder" in error["message"] and "Traceback" in error["traceback"]
        w.send("list_models", id="l4")
        assert w.next()["id"] == "l4"


def test_in_process_fetch_kinds_pick_what_is_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fetch_model's kind: a LoRA or an embedding is its one weight file (by repo or by file
    id), a model what the model loaders read; offline, from a hub cache on disk."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    files = {"pytorch_lora_weights.safetensors": b"l" * 10, "README.md": b"# a LoRA"}
    weights = cached_model(cache, "test/lora", files) / "pytorch_lora_weights.safetensors"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with in_process(tmp_path) as w:
        for request_id, model, kind in (
            ("a", "test/lora", "lora"),
            ("b", "test/lora/pytorch_lora_weights.safetensors", "embedding"),
            ("c", "test/lora/pytorch_lora_weights.safetensors", "model"),
        ):
            w.send("fetch_model", id=request_id, model=model, kind=kind)
            fetched = w.next()
            assert fetched == {"type": "fetched", "id": request_id, "model": model,
                               "path": str(weights)}, kind  # fmt: skip
        # As a whole-repo model it needs diffusers configs, which the cache lacks.
        w.send("fetch_model", id="d", model="test/lora")
        error = w.next()
        assert (
            error["kind"] == "HubError"
            and "model 'test/lora' is not downloaded" in error["message"]
        )
        for bad in ("vae", 3, None):
            w.send("fetch_model", id="e", model="test/lora", kind=bad)
            error = w.next()
            assert (error["id"], error["kind"]) == ("e", "ValueError")
            assert error["message"] == (
                f"kind: must be one of model, controlnet, lora, embedding, got {bad!r}"
            )


def test_in_process_downloads_report_progress_and_cancel(
    tiny_models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the worker makes of a download's hooks (a stand-in for the network: tests/
    test_hub.py downloads from a local fake hub through a worker process)."""
    import backend.models.hub
    import backend.service.runner
    from backend.models.hub import DownloadCancelled, DownloadHooks, DownloadProgress

    calls = []

    def fetch_model(model: str, *, allow_pickle: bool, hooks: DownloadHooks) -> Path:
        calls.append((model, allow_pickle))
        assert hooks.progress is not None and hooks.should_cancel is not None
        hooks.progress(DownloadProgress(model, "unet/w.safetensors", 10, 1000, 1234.5678, 0, 2))
        deadline = time.monotonic() + (20 if model == "test/slow" else 0)
        while time.monotonic() < deadline and not hooks.should_cancel():
            time.sleep(0.01)
        if hooks.should_cancel():
            raise DownloadCancelled()
        return tmp_path / "snapshot"

    real_run_job = backend.service.runner.run_job

    def run_job(job: Any, cache: Any, events: Any, **kwargs: Any) -> Any:
        events.download(DownloadProgress("test/m", "config.json", 5, 9, 2.25, 1, 3))
        return real_run_job(job, cache, events, **kwargs)

    monkeypatch.setattr(backend.models.hub, "fetch_model", fetch_model)
    monkeypatch.setattr(backend.service.runner, "run_job", run_job)

    def download(request_id: str, model: str, rate: float, **rest: Any) -> dict[str, Any]:
        return {"type": "download", "id": request_id, "model": model, "rate": rate, **rest}

    with in_process(tmp_path) as w:
        w.send("fetch_model", id="d1", model="test/slow", allow_pickle=True)
        assert w.next() == download(
            "d1",
            "test/slow",
            1234.6,  # rounded
            file="unet/w.safetensors",
            bytes_done=10,
            bytes_total=1000,
            files_done=0,
            files_total=2,
        )
        w.send("cancel", id="d1")
        assert w.next() == {"type": "cancelled", "id": "d1"}
        w.send("fetch_model", id="d2", model="test/fast")
        assert w.next()["id"] == "d2"
        assert w.next() == {
            "type": "fetched",
            "id": "d2",
            "model": "test/fast",
            "path": str(tmp_path / "snapshot"),
        }
        w.send("generate", id="g", job=job(tmp_path / "out"))
        replies = w.until_terminal("g")
        assert replies[:2] == [
            {"type": "accepted", "id": "g"},
            download(
                "g",
                "test/m",
                2.2,  # rounded half to even
                file="config.json",
                bytes_done=5,
                bytes_total=9,
                files_done=1,
                files_total=3,
            ),
        ]
        assert replies[-1]["type"] == "done"
    assert calls == [("test/slow", True), ("test/fast", False)]


@pytest.mark.parametrize("kept", [None, 2])
def test_in_process_max_models_keeps_that_many_models_loaded(
    tiny_models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kept: int | None
) -> None:
    """``serve --max-models``: base models kept loaded between jobs (1 by default)."""
    import backend.models.loading

    loads = []
    real = backend.models.loading.load_base_model

    def load_base_model(name: str, *args: Any, **kwargs: Any) -> Any:
        loads.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(backend.models.loading, "load_base_model", load_base_model)
    args = {} if kept is None else {"max_models": kept}
    folder = str(tiny_models["tiny"])  # the same model by another name: another cache entry
    with in_process(tmp_path, **args) as w:
        for i, model in enumerate(["builtin:tiny", folder, "builtin:tiny"]):
            w.send("generate", id=str(i), job=job(tmp_path / str(i), model=model, frames=1))
            assert w.until_terminal(str(i))[-1]["type"] == "done"
    assert len(loads) == (3 if kept is None else 2), loads


def test_in_process_frame_1_previews_while_denoising(
    tiny_models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs preview frame 1 as it forms (every DENOISING_PREVIEW_SECONDS; made short here)."""
    import backend.service.worker

    monkeypatch.setattr(backend.service.worker, "DENOISING_PREVIEW_SECONDS", 0.001)
    with in_process(tmp_path) as w:
        w.send("generate", id="f", job=job(tmp_path / "out", frames=2, steps=20))
        replies = w.until_terminal("f")
    forming = [m for m in of_type(replies, "preview") if ".preview-" in m["path"]]
    assert forming and all(m["frame"] == 1 and m["id"] == "f" for m in forming)
    assert replies[-1]["type"] == "done"


def test_read_requests_takes_a_binary_stream_too() -> None:
    """The reader reads bytes: a text stream's buffer, or a binary stream as it is."""
    from backend.service.worker import ProtocolWriter, Worker

    worker = Worker(ProtocolWriter(io.StringIO()))
    worker.read_requests(io.BytesIO(b'{"type":"generate","id":"q"}\n'))
    assert worker.requests.get_nowait() == {"type": "generate", "id": "q"}
    assert worker.requests.get_nowait() is None and worker.cancel.is_set()  # end of input
    assert worker.queued_ids == {"q"}


def test_in_process_long_tracebacks_are_kept_up_to_their_own_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed cache request's traceback is cut at MAX_TRACEBACK_CHARS, not at the
    (shorter) message limit."""
    import backend.models.hub

    def list_cached(depth: int = 40) -> list:
        if depth:
            return deeper(depth - 1)  # alternating frames: Python folds repeated ones
        raise OSError("the cache cannot be read")

    def deeper(depth: int) -> list:
        return list_cached(depth)

    monkeypatch.setattr(backend.models.hub, "list_cached", list_cached)
    with in_process(tmp_path) as w:
        w.send("list_models", id="l")
        error = w.next()
    assert error["kind"] == "OSError" and error["message"] == "the cache cannot be read"
    trace = error["traceback"]
    assert len(trace) > MAX_MESSAGE_CHARS + 1000
    if len(trace) > MAX_TRACEBACK_CHARS:  # frames are longer under coverage tools
        assert re.fullmatch(
            rf"(?s).{{{MAX_TRACEBACK_CHARS}}} \.\.\. \[\d+ more characters\]", trace
        )
    else:
        assert trace.endswith("OSError: the cache cannot be read\n")


def test_in_process_preview_detector_answers_with_the_control_image(tmp_path: Path) -> None:
    """preview_detector: the PNG is the control image a job of that size would get."""
    import numpy as np

    from backend.media.controls import load_control_frames
    from backend.media.video_io import read_frames, write_png
    from backend.protocol import ControlNetSpec, VideoInput

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        image = np.zeros((40, 60, 3), np.uint8)
        image[5 + 5 * i : 30, 10 : 20 + 10 * i] = 255
        write_png(folder / f"f{i}.png", image)
    with in_process(tmp_path) as w:
        w.send(
            "preview_detector",
            id="p1",
            control={"path": str(folder), "start": 1},
            detector="canny",
            frame=1,
            width=64,
            height=48,
        )
        detected = w.next()
        w.send("preview_detector", id="p2", control=str(folder), detector="hed", frame=0,
               width=64, height=64)  # fmt: skip
        refused = w.next()
        w.send("preview_detector", id="p3", control=str(folder), detector="depth", frame=9,
               width=64, height=64, detector_models={"pose": "a/b"})  # fmt: skip
        bad = w.next()
    assert {k: v for k, v in detected.items() if k != "path"} == {
        "type": "detected",
        "id": "p1",
        "detector": "canny",
        "frame": 1,
    }
    spec = ControlNetSpec("m", VideoInput(str(folder), start=1), detector="canny")
    expected = load_control_frames(spec, [1], 64, 48)[1]  # source image 2 at 64x48
    shown = read_frames(VideoInput(detected["path"]), [0], 64, 48)[0]
    assert np.array_equal(shown, expected) and expected.max() == 255
    assert refused["type"] == "error" and refused["id"] == "p2"
    assert "pickled" in refused["message"] and "hed" in refused["message"]
    assert bad["type"] == "error" and bad["kind"] == "JobError"
    assert bad["message"].startswith("detector_models.pose: ")


# --------------------------------------------------------------------------- hostile input


def test_in_process_replies_echo_request_ids_as_sent(tmp_path: Path) -> None:
    with in_process(tmp_path) as w:
        w.send("generate", id=7, job=job(tmp_path / "x", width=100))
        w.send("generate", id=None, job=job(tmp_path / "y", width=100))
        w.send("remove_model", id=8, model="owner/not-cached")
        replies = [w.next(), w.next(), w.next()]
    assert [(m["type"], m["id"]) for m in replies] == [("error", 7), ("error", None), ("error", 8)]
    assert type(replies[0]["id"]) is int


def test_the_worker_keeps_stdin_from_libraries(backend_env: dict) -> None:
    """A library prompt (input()) reads the null device, never the protocol pipe."""
    code = (
        "import os, sys\n"
        "from backend.service.worker import _claim_stdin\n"
        "requests = _claim_stdin()\n"
        "try:\n"
        "    answer = input('run the custom code? [y/N] ')\n"
        "except EOFError:\n"
        "    answer = 'EOF'\n"
        "print(answer, os.read(0, 10), requests.readline(), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=b"y\n",
        capture_output=True,
        env=backend_env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.decode().strip().endswith("EOF b'' b'y\\n'"), done.stderr


def test_a_model_asking_for_custom_code_is_an_error_and_the_worker_answers_on(
    worker: WorkerProcess, tiny_models: dict, tmp_path: Path
) -> None:
    from test_models import hostile_config_folder

    marker = tmp_path / "marker.txt"
    folder = hostile_config_folder(tiny_models["tiny"], tmp_path / "evil-model", marker)
    worker.send("generate", id="evil", job=job(tmp_path / "out", model=str(folder)))
    worker.send("generate", id="after", job=job(tmp_path / "x", width=100))
    evil = worker.until_terminal("evil", timeout=60)[-1]
    assert evil["type"] == "error" and "auto_map" in evil["message"], evil
    assert str(folder / "text_encoder" / "config.json") in evil["message"]
    assert worker.until_terminal("after", timeout=60)[-1]["type"] == "error"
    assert not marker.exists() and not (tmp_path / "out").exists()
