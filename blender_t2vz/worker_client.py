"""Background processes spoken to over stdin/stdout: the backend worker and the installer.

No bpy here. A reader thread turns each stdout line into a message on a queue and does
nothing else; the owner drains the queue from Blender's main thread (a timer or a modal
operator) and is the only one that touches Blender data.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import backend_paths

# Client-side message types (never sent by the worker): a stdout line that is not part
# of the protocol, and the process's end.
NOISE = "_noise"
EXITED = "_exit"
LINE = "_line"

# Once the process has ended, how long to wait for the stderr reader to reach the end of
# stderr (its last words) before reporting the exit; only a grandchild process that
# inherited stderr keeps it open longer.
STDERR_GRACE = 2.0


def exit_text(returncode: int | None) -> str:
    """How a process ended, for a person: "exit code 1", or the signal that stopped it
    (POSIX reports -N for signal N: -9 is what the out-of-memory killer sends)."""
    if returncode is None or returncode >= 0:
        return f"exit code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        return f"exit code {returncode}"
    if name == "SIGKILL":
        return "killed by SIGKILL: out of memory, or stopped by hand"
    if name in ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT"):
        return f"crashed with {name}"
    return f"stopped by {name}"


class WorkerError(RuntimeError):
    """The worker could not be started or spoken to."""


def _clean_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    """The child's environment: ours without Blender's Python settings, plus ``extra``."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE"):
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    if extra:
        env.update({k: v for k, v in extra.items() if v is not None})
    return env


class LineProcess:
    """A child process whose stdout lines arrive as messages on a queue.

    ``parse`` turns a line into a message dict (raise ValueError to mark it as noise);
    the default wraps it as ``{"type": "_line", "text": line}``. When stdout closes, an
    ``{"type": "_exit", "returncode": int}`` message is queued last. stderr is kept in a
    bounded tail for error messages.
    """

    def __init__(
        self,
        argv: Sequence[str],
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        parse: Callable[[str], dict[str, Any]] | None = None,
        stdin: bool = False,
        stderr_lines: int = 200,
    ):
        self.argv = [str(a) for a in argv]
        self.cwd = str(cwd) if cwd is not None else None
        self.env = _clean_env(env)
        self.parse = parse
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        self._want_stdin = stdin
        self._write_lock = threading.Lock()
        self._stderr_reader: threading.Thread | None = None
        self.proc: subprocess.Popen[str] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the process and its reader threads; raise WorkerError when it cannot run."""
        executable = Path(self.argv[0])
        if not executable.is_file():
            raise WorkerError(f"python not found: {executable}")
        flags = 0
        if os.name == "nt":  # no console window popping up beside Blender
            flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        try:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.PIPE if self._want_stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                creationflags=flags,
            )
        except OSError as exc:
            raise WorkerError(f"cannot start {self.argv[0]}: {exc}") from exc
        self._stderr_reader = threading.Thread(
            target=self._read_stderr, name="t2vz-stderr", daemon=True
        )
        self._stderr_reader.start()
        threading.Thread(target=self._read_stdout, name="t2vz-stdout", daemon=True).start()

    @property
    def pid(self) -> int | None:
        """The process id, once started."""
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended."""
        return None if self.proc is None else self.proc.poll()

    def stderr_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines the process wrote to stderr."""
        return "\n".join(list(self._stderr)[-lines:])

    def _collect_stderr(self, timeout: float = STDERR_GRACE) -> None:
        """Wait (up to ``timeout`` s) until the stderr reader has read to the end of stderr:
        the tail then holds the last words of a process that has ended."""
        reader = self._stderr_reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout)

    def kill(self) -> None:
        """End the process now."""
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)

    def close(self, timeout: float = 5.0) -> None:
        """Close stdin, wait up to ``timeout`` seconds, then terminate and kill; the stderr
        tail then holds the process's last words."""
        if self.proc is None:
            return
        if self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.kill()
        self._collect_stderr()

    # ------------------------------------------------------------------ io

    def write_line(self, line: str) -> None:
        """Write one line to the process's stdin; raise WorkerError if it is gone."""
        if self.proc is None or self.proc.stdin is None:
            raise WorkerError("process has no stdin")
        if not self.alive:
            raise WorkerError(f"process exited with status {self.returncode}")
        with self._write_lock:
            try:
                self.proc.stdin.write(line + "\n")
                self.proc.stdin.flush()
            except (OSError, ValueError) as exc:
                raise WorkerError(f"cannot write to the process: {exc}") from exc

    def poll(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Up to ``limit`` queued messages, oldest first, without waiting."""
        out = []
        while len(out) < limit:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                break
        return out

    def wait_message(self, timeout: float) -> dict[str, Any] | None:
        """The next message, waiting up to ``timeout`` seconds (for scripts and tests)."""
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            if self.parse is None:
                self.messages.put({"type": LINE, "text": line})
                continue
            try:
                message = self.parse(line)
            except ValueError:
                message = {"type": NOISE, "text": line}
                self._stderr.append(f"[stdout] {line}")
            self.messages.put(message)
        self.proc.wait()
        # The exit is reported with the last words of a crash: once stderr is read to its end
        # (a fixed pause here missed them when the machine was busy).
        self._collect_stderr()
        self.messages.put({"type": EXITED, "returncode": self.proc.returncode})

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._stderr.append(raw.rstrip("\r\n"))


class WorkerClient(LineProcess):
    """``python -m backend serve``: JSON protocol lines both ways, models kept loaded."""

    def __init__(
        self,
        python: str | os.PathLike[str],
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = ("-m", "backend", "serve"),
    ):
        self.protocol = backend_paths.load_protocol()
        if cwd is None:
            cwd = backend_paths.backend_root()
        super().__init__(
            [str(python), *args],
            cwd=cwd,
            env=env,
            parse=self.protocol.decode_message,
            stdin=True,
        )

    def send(self, kind: str, /, **payload: Any) -> None:
        """Send one protocol request (generate, cancel, shutdown); ``kind`` is positional-only:
        a fetch_model request carries a ``kind`` field of its own."""
        if kind not in self.protocol.REQUESTS:
            raise ValueError(f"not a request type: {kind!r}")
        self.write_line(self.protocol.encode_message(kind, **payload))

    def generate(self, job_id: str, job: Mapping[str, Any], allow_pickle: bool = False) -> None:
        """Ask the worker to run ``job``; replies carry ``job_id``.

        ``allow_pickle`` (the user's preference) travels beside the job, never inside it.
        """
        payload: dict[str, Any] = {"id": job_id, "job": dict(job)}
        if allow_pickle:
            payload["allow_pickle"] = True
        self.send("generate", **payload)

    def cancel(self, job_id: str) -> None:
        """Ask the worker to stop ``job_id`` after the current denoising step."""
        self.send("cancel", id=job_id)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit, then make sure it has."""
        if self.alive:
            with contextlib.suppress(WorkerError):
                self.send("shutdown")
        self.close(timeout=timeout)
