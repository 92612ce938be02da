"""The persistent worker: ``python -m backend serve``, JSON lines on stdin/stdout.

A reader thread turns request lines into a queue (and sets the cancel flag at once, so a
cancel lands within one model evaluation); the main thread runs jobs one at a time with
a model cache that survives between jobs. stdout carries only protocol lines: anything
else a library prints is sent to stderr with the logs. Errors cross the process boundary
as text (kind, message, traceback), never as pickled objects.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, TextIO

from .. import __version__
from ..protocol import (
    FETCH_KINDS,
    HUB_ID_FORMS,
    MAX_LINE_BYTES,
    MAX_TRACEBACK_CHARS,
    QUEUED_REQUESTS,
    JobError,
    clip_text,
    decode_message,
    encode_message,
    hub_id_problem,
    shown,
    validate_job,
)

log = logging.getLogger(__name__)

# The add-on shows frame 1 forming while a job denoises, refreshed at most this often.
DENOISING_PREVIEW_SECONDS = 2.0


class ProtocolWriter:
    """Writes protocol lines to the real stdout, one whole line at a time."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.lock = threading.Lock()

    def send(self, kind: str, /, **payload: Any) -> None:
        """Send one message."""
        if kind == "error":  # a reply never echoes megabytes of a bad value or a long trace
            payload["message"] = clip_text(str(payload.get("message", "")))
            payload["traceback"] = clip_text(str(payload.get("traceback", "")), MAX_TRACEBACK_CHARS)
        line = encode_message(kind, **payload)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()


def _claim_stdout() -> TextIO:
    """Keep the real stdout for protocol lines and point fd 1 (and sys.stdout) at stderr."""
    sys.stdout.flush()
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(protocol_fd, "w", encoding="utf-8", buffering=1)


def _claim_stdin() -> IO[bytes]:
    """Keep the real stdin for protocol lines and point fd 0 (and sys.stdin) at the null
    device, so that no library can prompt on the protocol pipe and read it (transformers'
    "run the custom code? [y/N]" would take a request line for its answer)."""
    protocol_fd = os.dup(0)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.close(null_fd)
    sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 (for the process's life)
    return os.fdopen(protocol_fd, "rb")


# Marks a request line longer than MAX_LINE_BYTES (skipped without being kept in memory).
TOO_LONG = b""


def bounded_lines(stream: IO[bytes], limit: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """The lines of ``stream``, or TOO_LONG for a line over ``limit`` bytes (its rest skipped)."""
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while True:  # skip to the end of this line, a bounded piece at a time
                rest = stream.readline(1 << 16)
                if not rest or rest.endswith(b"\n"):
                    break
            yield TOO_LONG
            continue
        yield line


class Worker:
    """Request loop state: the queue, the job being run and its cancel flag."""

    def __init__(self, writer: ProtocolWriter, max_models: int = 1, cluster: Any = None):
        from ..models.loading import ModelCache

        self.writer = writer
        # The Ray cluster jobs go to (serve --cluster, $T2VZ_CLUSTER); a request's own
        # "cluster" replaces it. None: jobs run in this process.
        self.cluster = cluster
        self.requests: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.cancel = threading.Event()
        # Set by shutdown or the end of input: the running job stops, queued ones never start.
        self.stopping = threading.Event()
        # Request ids are echoed exactly as sent (a string, an integer or null: see
        # protocol.decode_message), never turned into text: 7 stays 7, null stays null.
        self.current_id: str | int | None = None
        # Jobs waiting in the queue, and those of them cancelled before they started.
        self.queued_ids: set[str | int | None] = set()
        self.cancelled_ids: set[str | int | None] = set()
        self.lock = threading.Lock()
        self.cache = ModelCache(max_bases=max_models)
        # Where preview_detector writes its PNGs (made on first use).
        self.detected_folder: Path | None = None

    def read_requests(self, stream: IO[bytes] | TextIO) -> None:
        """Reader thread: parse lines; cancels act at once, the rest is queued.

        Whatever a line holds (no JSON, invalid UTF-8, nesting too deep, megabytes) it gets
        an error reply and the thread reads on: only ``shutdown`` or the end of input stop it.
        """
        binary = getattr(stream, "buffer", stream)
        for line in bounded_lines(binary):
            try:
                if self.handle_line(line):
                    return
            except Exception as exc:  # never let one line end the reader: report it
                log.exception("request line could not be handled")
                self.send_protocol_error(f"{type(exc).__name__}: {exc}")
        self.stop()  # stdin closed: the add-on is gone
        self.requests.put(None)

    def send_protocol_error(self, text: str) -> None:
        """Reply to a line that is no valid request (it has no job id to answer to)."""
        self.writer.send("error", id=None, kind="ProtocolError", message=text, traceback="")

    def handle_line(self, line: bytes) -> bool:
        """Act on one request line; True when it was ``shutdown``."""
        if line == TOO_LONG:
            self.send_protocol_error(
                f"request line longer than {MAX_LINE_BYTES} bytes refused (skipped unread)"
            )
            return False
        if not line.strip():
            return False
        try:
            message = decode_message(line)
        except ValueError as exc:
            self.send_protocol_error(str(exc))
            return False
        if message["type"] == "cancel":
            self.request_cancel(message.get("id"))
            return False
        if message["type"] == "list_models":
            self.list_models(message)  # read-only and quick: answered even while a job runs
            return False
        if message["type"] == "cluster_info":  # up to 15 s: its own thread, never the queue
            threading.Thread(target=self.cluster_info, args=(message,), daemon=True).start()
            return False
        if message["type"] in QUEUED_REQUESTS:
            with self.lock:
                self.queued_ids.add(message.get("id"))
        if message["type"] == "shutdown":
            self.stop()
            self.requests.put(message)
            return True
        self.requests.put(message)
        return False

    def stop(self) -> None:
        """Shutdown or end of input: cancel the running job; queued requests never start."""
        with self.lock:
            self.stopping.set()
            self.cancel.set()

    def request_cancel(self, job_id: Any) -> None:
        """Cancel the running job now, or a queued one as soon as it comes up."""
        with self.lock:
            if job_id is None or job_id == self.current_id:
                self.cancel.set()
            elif job_id in self.queued_ids:
                self.cancelled_ids.add(job_id)
            # A cancel for a finished or unknown job has nothing to stop.

    def run_one(self, message: dict[str, Any]) -> None:
        """Validate and run one generate request, replying with the outcome."""
        from ..engine.pipeline import Cancelled
        from .runner import JobEvents, run_job

        job_id = message.get("id")
        # The request's own switch (the add-on sets it from its preference), never the job's.
        allow_pickle = message.get("allow_pickle", False)
        try:
            if not isinstance(allow_pickle, bool):
                raise JobError("allow_pickle", f"expected bool, got {shown(allow_pickle)}")
            job = validate_job(message.get("job"))
        except (JobError, RecursionError) as exc:
            with self.lock:
                self.queued_ids.discard(job_id)
                self.cancelled_ids.discard(job_id)
            self.writer.send("error", id=job_id, kind="JobError", message=str(exc), traceback="")
            return
        with self.lock:
            # Leaving the queue and becoming current is one step, so no cancel falls between.
            self.queued_ids.discard(job_id)
            if job_id in self.cancelled_ids or self.stopping.is_set():
                self.cancelled_ids.discard(job_id)
                self.writer.send("cancelled", id=job_id)
                return
            self.current_id = job_id
            self.cancel.clear()
        self.writer.send("accepted", id=job_id)

        def progress(step, total, written, frames, fraction, stage):
            self.writer.send(
                "progress",
                id=job_id,
                step=step,
                total=total,
                frames_done=written,
                frames_total=frames,
                fraction=round(fraction, 4),
                stage=stage,
            )

        def preview(frame, path):
            self.writer.send("preview", id=job_id, frame=frame + 1, path=path)

        events = JobEvents(
            progress=progress,
            preview=preview,
            download=self.download_reporter(job_id),
            should_cancel=self.cancel.is_set,
            preview_every=DENOISING_PREVIEW_SECONDS,
        )
        try:
            cluster = self.cluster_for(message)
            if cluster is None:
                result = run_job(job, self.cache, events, allow_pickle=allow_pickle)
            else:
                from .cluster import run_on_cluster

                result = run_on_cluster(job, cluster, events, allow_pickle=allow_pickle)
        except Cancelled:
            self.writer.send("cancelled", id=job_id)
        except Exception as exc:
            log.exception("job %s failed", job_id)
            self.writer.send(
                "error",
                id=job_id,
                kind=type(exc).__name__,
                message=str(exc),
                traceback=traceback.format_exc(),
            )
        else:
            self.writer.send(
                "done",
                id=job_id,
                out=result.out,
                frames=result.frames,
                seconds=round(result.seconds, 3),
            )
        finally:
            with self.lock:
                self.current_id = None

    # ------------------------------------------------------------------ the model cache

    def download_reporter(self, request_id: str | int | None) -> Any:
        """A DownloadHooks.progress callback sending ``download`` messages for ``request_id``."""

        def report(progress: Any) -> None:
            payload = progress.to_dict()
            payload["rate"] = round(payload["rate"], 1)
            self.writer.send("download", id=request_id, **payload)

        return report

    def _fail(self, request_id: Any, exc: BaseException) -> None:
        """An error reply for a request that raised ``exc``."""
        self.writer.send(
            "error",
            id=request_id,
            kind=type(exc).__name__,
            message=clip_text(str(exc)),
            traceback=clip_text(traceback.format_exc(), MAX_TRACEBACK_CHARS),
        )

    def cluster_for(self, message: dict[str, Any]) -> Any:
        """The ClusterConfig of a request: its "cluster" {address, token?, shard_size?}, an
        empty address for this process, or (no field) the worker's own."""
        given = message.get("cluster")
        if given is None:
            return self.cluster
        if not isinstance(given, dict) or not isinstance(given.get("address", ""), str):
            raise JobError(
                "cluster", f"expected {{address, token, shard_size}}, got {shown(given)}"
            )
        if not given.get("address"):
            return None
        from .cluster import ClusterConfig

        shard_size = given.get("shard_size")
        if shard_size is not None and (
            isinstance(shard_size, bool) or not isinstance(shard_size, int)
        ):
            raise JobError("cluster.shard_size", f"expected an integer, got {shown(shard_size)}")
        token = given.get("token") or None
        if token is not None and not isinstance(token, str):
            raise JobError("cluster.token", "expected a string")
        return ClusterConfig(given["address"].strip(), token, shard_size)

    def cluster_info(self, message: dict[str, Any]) -> None:
        """Answer cluster_info: the GPUs, CPUs and nodes the cluster shows (or an error)."""
        request_id = message.get("id")
        try:
            config = self.cluster_for(message)
            if config is None:
                raise ValueError(
                    "cluster: no cluster address given (serve --cluster or a request's)"
                )
            from .cluster import cluster_info

            self.writer.send("cluster", id=request_id, **cluster_info(config))
        except Exception as exc:  # noqa: BLE001 (reported to the add-on; the worker goes on)
            self._fail(request_id, exc)

    def list_models(self, message: dict[str, Any]) -> None:
        """Answer list_models: the hub cache's models and sizes."""
        from ..models.hub import cache_location, list_cached

        request_id = message.get("id")
        try:
            models = list_cached()
        except Exception as exc:  # noqa: BLE001 (a broken cache must not end the worker)
            self._fail(request_id, exc)
            return
        self.writer.send("models", id=request_id, cache_dir=str(cache_location()), models=models)

    def run_cache_request(self, message: dict[str, Any]) -> None:
        """Run a queued fetch_model or remove_model request."""
        from ..models.hub import (
            DownloadCancelled,
            DownloadHooks,
            fetch_adapter,
            fetch_model,
            remove_cached,
        )

        request_id = message.get("id")
        model = message.get("model")
        with self.lock:
            self.queued_ids.discard(request_id)
            if request_id in self.cancelled_ids:
                self.cancelled_ids.discard(request_id)
                self.writer.send("cancelled", id=request_id)
                return
            self.current_id = request_id
            self.cancel.clear()
        try:
            if message["type"] == "preview_detector":
                self.preview_detector(request_id, message)
                return
            if message["type"] == "remove_model":
                if not isinstance(model, str) or model.count("/") != 1:
                    raise ValueError(f"model: expected a hub id (owner/name), got {model!r}")
                freed = remove_cached(model)
                self.writer.send("removed", id=request_id, model=model, freed=freed)
                return
            model, kind = fetch_request(message)
            hooks = DownloadHooks(self.download_reporter(request_id), self.cancel.is_set)
            allow_pickle = bool(message.get("allow_pickle"))
            if kind in ("lora", "embedding"):
                path = fetch_adapter(model, kind, allow_pickle=allow_pickle, hooks=hooks)
            else:
                path = fetch_model(model, allow_pickle=allow_pickle, hooks=hooks)
            self.writer.send("fetched", id=request_id, model=model, path=str(path))
        except DownloadCancelled:
            self.writer.send("cancelled", id=request_id)
        except Exception as exc:  # noqa: BLE001 (reported to the add-on; the worker goes on)
            log.warning("%s %s failed: %s", message["type"], model, exc)
            self._fail(request_id, exc)
        finally:
            with self.lock:
                self.current_id = None

    def preview_detector(self, request_id: Any, message: dict[str, Any]) -> None:
        """Answer preview_detector: one control frame through its detector, as a PNG."""
        from ..media.controls import detector_preview
        from ..media.detectors import DetectorRun
        from ..media.video_io import write_png
        from ..models.hub import DownloadHooks
        from ..models.loading import resolve_device
        from ..protocol import validate_detector_preview

        request = validate_detector_preview(message)
        allow_pickle = message.get("allow_pickle", False)
        if not isinstance(allow_pickle, bool):
            raise JobError("allow_pickle", f"expected bool, got {shown(allow_pickle)}")
        device = resolve_device("auto")
        hooks = DownloadHooks(self.download_reporter(request_id), self.cancel.is_set)
        run = DetectorRun(
            load=lambda name, models: self.cache.detector(name, models, device, hooks)
        )
        image = detector_preview(request, run, allow_pickle)
        path = self.detected_file(request.detector)
        write_png(path, image)
        self.writer.send(
            "detected",
            id=request_id,
            detector=request.detector,
            frame=request.frame,
            path=str(path),
        )

    def detected_file(self, detector: str, keep: int = 4) -> Path:
        """A new PNG path in this worker's preview folder; all but the newest ``keep`` go."""
        import tempfile
        import uuid

        folder = self.detected_folder
        if folder is None or not folder.is_dir():
            folder = self.detected_folder = Path(tempfile.mkdtemp(prefix="t2vz-detected-"))
        for old in sorted(folder.glob("*.png"), key=lambda p: p.stat().st_mtime)[: -keep + 1]:
            old.unlink(missing_ok=True)
        return folder / f"{detector}-{uuid.uuid4().hex[:8]}.png"

    def loop(self) -> None:
        """Main thread: run requests until shutdown or end of input."""
        while True:
            message = self.requests.get()
            if message is None or message["type"] == "shutdown" or self.stopping.is_set():
                return  # requests still queued behind a shutdown are dropped
            if message["type"] == "generate":
                self.run_one(message)
            elif message["type"] in QUEUED_REQUESTS:
                self.run_cache_request(message)
            else:
                self.writer.send(
                    "error",
                    id=message.get("id"),
                    kind="ProtocolError",
                    message=f"unexpected request {message['type']!r}",
                    traceback="",
                )


def fetch_request(message: dict[str, Any]) -> tuple[str, str]:
    """(hub id, kind) of a fetch_model request, kind "model" by default; ValueError naming
    the field and the value when either is wrong."""
    model, kind = message.get("model"), message.get("kind", "model")
    problem = hub_id_problem(model) if isinstance(model, str) else f"a hub id is {HUB_ID_FORMS}"
    if problem:
        raise ValueError(f"model: expected a hub id, got {shown(model)}: {problem}")
    if not isinstance(kind, str) or kind not in FETCH_KINDS:
        raise ValueError(f"kind: must be one of {', '.join(FETCH_KINDS)}, got {shown(kind)}")
    return model, kind


def serve(max_models: int = 1, stdin: IO[bytes] | TextIO | None = None, cluster: Any = None) -> int:
    """Run the worker until ``shutdown`` or the end of stdin (jobs on ``cluster`` if given)."""
    writer = ProtocolWriter(_claim_stdout())
    requests = stdin if stdin is not None else _claim_stdin()
    worker = Worker(writer, max_models=max_models, cluster=cluster)
    reader = threading.Thread(
        target=worker.read_requests, args=(requests,), daemon=True, name="t2vz-stdin"
    )
    reader.start()
    writer.send("ready", version=__version__, pid=os.getpid())
    worker.loop()
    return 0
