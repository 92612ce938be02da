"""The worker client against a fake worker: queueing, noise, exit, stderr (no bpy used)."""

import json
import sys
import threading
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


# ------------------------------------------------ LineProcess on small scripts of its own


def _script(code: str, **kwargs) -> worker_client.LineProcess:
    """A started LineProcess running ``code`` in this python."""
    process = worker_client.LineProcess([sys.executable, "-c", code], **kwargs)
    process.start()
    return process


def _tail(process: worker_client.LineProcess, last: str, timeout: float = 20.0) -> str:
    """The stderr tail once its reader thread has collected ``last``."""
    deadline = time.monotonic() + timeout
    while last not in process.stderr_tail() and time.monotonic() < deadline:
        time.sleep(0.05)
    return process.stderr_tail()


def test_child_environment_drops_blenders_python_settings(monkeypatch) -> None:
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE"):
        monkeypatch.setenv(name, "/blender/python")
    monkeypatch.setenv("T2VZ_KEPT", "yes")
    monkeypatch.setenv("PYTHONUNBUFFERED", "0")
    monkeypatch.delenv("PYTHONIOENCODING", raising=False)
    env = worker_client._clean_env({"HF_HUB_OFFLINE": "1", "T2VZ_KEPT": None})
    assert not {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE"} & set(env)
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONIOENCODING"] == "utf-8"
    assert env["HF_HUB_OFFLINE"] == "1" and env["T2VZ_KEPT"] == "yes"  # None: left as it was
    assert worker_client._clean_env(None)["T2VZ_KEPT"] == "yes"


def test_lines_exit_and_stderr_tail_of_a_plain_process(tmp_path: Path) -> None:
    code = (
        "import os, sys\n"
        "print('first X \\r')\n"  # only the line end is cut, not a final X or space
        "print('   ')\n"  # blank: no message
        "print(os.getcwd(), os.environ['T2VZ_X'])\n"
        "for i in range(5):\n"
        "    print(f'err {i} X \\r', file=sys.stderr)\n"
        "sys.exit(4)\n"
    )
    process = worker_client.LineProcess(
        [sys.executable, "-c", code], cwd=tmp_path, env={"T2VZ_X": "x1"}, stderr_lines=3
    )
    assert (process.pid, process.alive, process.returncode) == (None, False, None)
    process.start()
    seen = _until(process, worker_client.EXITED)
    assert seen == [
        {"type": worker_client.LINE, "text": "first X "},
        {"type": worker_client.LINE, "text": f"{tmp_path.resolve()} x1"},
        {"type": worker_client.EXITED, "returncode": 4},
    ]
    assert process.returncode == 4 and not process.alive and process.pid > 0
    assert _tail(process, "err 4") == "err 2 X \nerr 3 X \nerr 4 X "  # the last 3 lines are kept
    assert process.stderr_tail(2) == "err 3 X \nerr 4 X "
    assert process.wait_message(0.05) is None
    with pytest.raises(worker_client.WorkerError, match="^process has no stdin$"):
        process.write_line("hello")


def test_unparsable_lines_are_noise_kept_in_the_tail() -> None:
    def parse(line: str) -> dict:
        if not line.startswith("{"):
            raise ValueError(line)
        return {"type": "json", "text": line}

    process = _script("print('{1}'); print('hello'); print('{2}')", parse=parse)
    seen = _until(process, worker_client.EXITED)
    assert [(m["type"], m.get("text")) for m in seen] == [
        ("json", "{1}"),
        (worker_client.NOISE, "hello"),
        ("json", "{2}"),
        (worker_client.EXITED, None),
    ]
    assert process.stderr_tail() == "[stdout] hello"


def test_poll_takes_what_is_queued_oldest_first_up_to_the_limit() -> None:
    process = worker_client.LineProcess([sys.executable])
    assert process.poll() == []
    for i in range(5):
        process.messages.put({"n": i})
    assert process.poll(limit=2) == [{"n": 0}, {"n": 1}]
    assert process.poll() == [{"n": 2}, {"n": 3}, {"n": 4}]


def test_written_lines_reach_the_process_until_it_exits() -> None:
    echo = "import sys\nfor line in sys.stdin:\n    print('got', line.strip(), flush=True)\n"
    process = _script(echo, stdin=True)
    process.write_line("one")
    assert process.wait_message(20) == {"type": worker_client.LINE, "text": "got one"}
    process.close(timeout=20)  # stdin closed: it ends on its own
    assert process.returncode == 0
    with pytest.raises(worker_client.WorkerError, match="process exited with status 0"):
        process.write_line("two")


def test_close_terminates_then_kills_a_process_that_will_not_end() -> None:
    stubborn = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    process = _script(stubborn, stdin=True)
    assert process.wait_message(20)["text"] == "ready"
    started = time.monotonic()
    process.close(timeout=0.2)
    assert process.returncode == -9 and time.monotonic() - started < 10
    polite = _script("import time\nprint('ready', flush=True)\ntime.sleep(60)\n")
    assert polite.wait_message(20)["text"] == "ready"
    polite.close(timeout=0.2)
    assert polite.returncode == -15  # terminated: no kill needed
    sleeper = _script("import time\ntime.sleep(60)\n")
    sleeper.kill()
    assert sleeper.returncode == -9 and not sleeper.alive


def test_bytes_that_are_not_utf8_do_not_stop_the_reader() -> None:
    process = _script("import sys\nsys.stdout.buffer.write(b'bad \\xff byte\\n')\nprint('next')\n")
    seen = _until(process, worker_client.EXITED)
    assert [m.get("text") for m in seen] == ["bad \ufffd byte", "next", None]


def test_reader_threads_never_keep_blender_from_quitting() -> None:
    process = _script("import time\ntime.sleep(60)\n", stdin=True)
    try:
        readers = {t.name: t.daemon for t in threading.enumerate() if t.name.startswith("t2vz-")}
        assert readers == {"t2vz-stdout": True, "t2vz-stderr": True}
        process.proc.stdin.close()  # still running, but its stdin is gone
        with pytest.raises(worker_client.WorkerError, match="^cannot write to the process: I/O"):
            process.write_line("late")
    finally:
        process.kill()


def test_a_file_that_cannot_run_is_a_clear_error(tmp_path: Path) -> None:
    text = tmp_path / "python"
    text.write_text("not a program")
    text.chmod(0o644)
    with pytest.raises(worker_client.WorkerError, match="cannot start .*python: "):
        worker_client.LineProcess([text]).start()


def test_requests_are_protocol_lines(tmp_path: Path) -> None:
    echo = (
        "import os, sys\n"
        "print(os.environ['T2VZ_X'], file=sys.stderr, flush=True)\n"
        "for line in sys.stdin:\n"
        "    print(line.strip(), file=sys.stderr, flush=True)\n"
    )
    client = worker_client.WorkerClient(
        sys.executable, cwd=tmp_path, env={"T2VZ_X": "x2"}, args=("-c", echo)
    )
    client.start()
    client.generate("g1", {"prompt": "a cat"})
    client.cancel("g1")
    client.send("fetch_model", id="f1", model="o/l/a.safetensors", kind="lora")
    client.shutdown(timeout=20)
    assert client.returncode == 0
    assert client.cwd == str(tmp_path)
    first, *lines = _tail(client, "shutdown").splitlines()
    assert first == "x2"  # the environment given to the client
    assert [json.loads(line) for line in lines] == [
        {"type": "generate", "id": "g1", "job": {"prompt": "a cat"}},
        {"type": "cancel", "id": "g1"},
        # the request's own kind field beside its type
        {"type": "fetch_model", "id": "f1", "model": "o/l/a.safetensors", "kind": "lora"},
        {"type": "shutdown"},
    ]
    client.shutdown(timeout=1)  # already gone: nothing to send, no error
    deaf = worker_client.WorkerClient(sys.executable, args=("-c", "import time; time.sleep(60)"))
    deaf.start()
    started = time.monotonic()
    deaf.shutdown(timeout=0.2)  # a worker that does not listen is ended after the timeout
    assert deaf.returncode == -15 and time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (0, "exit code 0"),
        (1, "exit code 1"),
        (None, "exit code None"),
        (-9, "killed by SIGKILL: out of memory, or stopped by hand"),
        (-11, "crashed with SIGSEGV"),
        (-15, "stopped by SIGTERM"),
        (-2, "stopped by SIGINT"),
        (-1000, "exit code -1000"),  # no such signal
    ],
)
def test_exit_text_names_the_signal_that_stopped_a_process(code: int | None, said: str) -> None:
    """ "exit code -9" told an artist nothing; the out-of-memory killer sends SIGKILL."""
    assert worker_client.exit_text(code) == said
