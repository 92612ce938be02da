"""The job in flight: the backend worker, the job's state, and the main-thread step.

One ``Runner`` per Blender session keeps the worker alive between jobs (models stay
loaded). Its ``step`` drains the worker's queued messages and applies them to Blender:
status, progress, preview, and the result strip. Only ``step`` (called from a
``bpy.app.timers`` timer or a modal operator) touches bpy; the worker client's threads
never do. In the ``bpy`` module there is no event loop, so scripts and tests call ``step``
themselves (see ``Runner.wait``).
"""

import contextlib
import json
import math
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bpy
import bpy.utils.previews

from . import backend_paths, capabilities, strips
from .worker_client import EXITED, NOISE, LineProcess, WorkerClient, WorkerError, exit_text

INTERVAL_BUSY = 0.1
INTERVAL_IDLE = 1.0
CANCEL_TIMEOUT = 30.0
DEAD_GRACE = 2.0
INSTALL_PREFIX = "[t2vz]"
# The share of a job's progress fraction that is denoising (backend runner: 0.9; decoding
# and writing the frames are the rest).
DENOISE_SHARE = 0.9
HISTORY = 50  # outcomes kept in Runner.history


class RunnerBusyError(RuntimeError):
    """A job is already running."""


@dataclass
class ActiveJob:
    """A job sent to the worker and where its result goes."""

    id: str
    job: dict[str, Any]
    scene: str
    above: int
    start: int
    name: str
    staging: Path | None = None
    cancel_at: float | None = None
    # "generate", or "fetch": a model download ahead of the first job (no strip, no folder)
    kind: str = "generate"
    # The take group the result joins (a Regenerate's: its strip's); empty: a new group.
    take_group: str = ""
    # The strip the job reads (pix2pix, strip-driven ControlNet), recorded on the result.
    source: str = ""
    # The highest denoising step shown so far: the counter never goes back.
    step_shown: int = 0
    started: float = field(default_factory=time.monotonic)
    # (time, fraction) of the first progress message: the job's speed is measured from
    # there, without the worker's start and the model's loading.
    clock: tuple[float, float] | None = None


@dataclass
class QueuedJob:
    """A job waiting for the one in flight to end (Generate while a job runs)."""

    id: str
    job: dict[str, Any]
    scene: str
    above: int
    start: int
    name: str
    python: str | Path
    env: dict[str, str] | None = None
    staging: Path | None = None
    allow_pickle: bool = False
    take_group: str = ""
    source: str = ""


@dataclass
class Outcome:
    """How the last job ended: level is INFO, WARNING or ERROR (as in Operator.report)."""

    job_id: str
    level: str
    message: str
    strip_name: str | None = None
    frames: list[str] = field(default_factory=list)


def _status() -> Any:
    return bpy.context.window_manager.t2vz_status


def _redraw() -> None:
    wm = bpy.context.window_manager
    for window in wm.windows:
        screen = window.screen
        if screen is None:
            continue
        for area in screen.areas:
            if area.type in {"SEQUENCE_EDITOR", "PREFERENCES"}:
                area.tag_redraw()


def _wm_progress(kind: str, value: float = 0.0) -> None:
    wm = bpy.context.window_manager
    try:
        if kind == "begin":
            wm.progress_begin(0.0, 1.0)
        elif kind == "update":
            wm.progress_update(value)
        else:
            wm.progress_end()
    except (RuntimeError, AttributeError):
        pass


def remove_tree(path: Path | None) -> None:
    """Delete a folder the add-on made (staged inputs, a result nobody wants)."""
    if path is not None and path.exists():
        shutil.rmtree(path, ignore_errors=True)


def sweep_partials(out: str | Path | None) -> list[Path]:
    """Remove the staging folders beside ``out`` left by backend processes that are gone
    (killed by the OOM killer, SIGKILL, a crash); folders of running processes stay."""
    if not out:
        return []
    try:
        removed = backend_paths.load_protocol().sweep_stale_partials(Path(out).parent)
    except (OSError, backend_paths.BackendNotFoundError):
        return []
    for path in removed:
        print(f"T2VZ: removed {path}, left by a backend process that is gone", file=sys.stderr)
    return removed


def format_bytes(count: float) -> str:
    """A byte count as people read it: 512 B, 3.4 MB, 1.20 GB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}" if unit == "GB" else f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def download_text(message: dict[str, Any]) -> str:
    """The status line of a ``download`` message: model, file, bytes done of total, rate."""
    done, total = message.get("bytes_done") or 0, message.get("bytes_total") or 0
    text = f"Downloading {message.get('model')}"
    if message.get("file"):
        text += f" ({message.get('file')})"
    text += f": {format_bytes(done)} of {format_bytes(total)}"
    rate = float(message.get("rate") or 0.0)
    if rate > 0 and done < total:
        text += f" at {format_bytes(rate)}/s"
        text += f", {max(1, round((total - done) / rate))} s left"
    return text


def job_units(frames: int, steps: int, width: int, height: int) -> float:
    """A job's work: frames x steps x pixels, in 512 x 512 frame-steps."""
    return frames * steps * width * height / (512.0 * 512.0)


# Jobs estimated above this many seconds show their estimate before they start.
LONG_JOB_S = 60.0
# Jobs estimated above this many seconds ask for a confirmation before they start.
CONFIRM_JOB_S = 30 * 60.0
LAST_SPEED = "at the last job's speed"
# A first guess of the speed before any job has run on this machine, in seconds per
# 512 x 512 frame-step (job_units), for SD 1.5-sized models (built-in tiny ones are far
# faster: no guess for them), by the device the job runs on:
#   cuda: 3.463 s for 8 frames x 50 steps at 512 x 512, float16, on an H100 (BENCHMARKS.md,
#         section CUDA): 0.0087; smaller GPUs are slower.
#   cpu:  6.470 s for 4 frames x 3 steps at 64 x 64 on 2 AMD EPYC cores (BENCHMARKS.md,
#         "SD 1.5 architecture, text2video again"): 34.5.
ROUGH_SECONDS_PER_UNIT = {"cuda": 3.463 / (8 * 50), "cpu": 6.470 / job_units(4, 3, 64, 64)}
# Speeds remembered in the preferences (model and device pairs), the latest kept.
SPEEDS_KEPT = 20


def estimate_text(seconds: float | None, basis: str = LAST_SPEED) -> str:
    """ "About 12 min at the last job's speed" for a job estimated to take that long;
    "" for short or unknown ones. ``basis``: what the figure rests on."""
    if seconds is None or seconds < LONG_JOB_S:
        return ""
    if seconds < 3600:
        return f"About {max(1, round(seconds / 60))} min {basis}"
    return f"About {seconds / 3600:.1f} h {basis}"


def confirm_text(seconds: float | None, basis: str = LAST_SPEED) -> str:
    """The question a very long job asks before it starts; "" for the others."""
    if seconds is None or seconds < CONFIRM_JOB_S:
        return ""
    return f"{estimate_text(seconds, basis)}: start it?"


def speed_key(model: str, device: str) -> str:
    """How a job's speed is remembered: by the device setting and the model."""
    return f"{device}|{model}"


def _prefs() -> Any | None:
    addon = bpy.context.preferences.addons.get(__package__)
    return addon.preferences if addon is not None else None


def saved_speeds() -> dict[str, dict[str, Any]]:
    """The speeds remembered in the preferences: {"speeds": {speed_key: seconds per unit},
    "devices": {device setting: the device it ran on}}."""
    prefs = _prefs()
    try:
        saved = json.loads(getattr(prefs, "job_speeds", "") or "{}")
    except ValueError:
        saved = {}
    saved = saved if isinstance(saved, dict) else {}
    return {k: dict(saved.get(k) or {}) for k in ("speeds", "devices")}


def remember_speed(model: str, device: str, ran_on: str, seconds_per_unit: float) -> None:
    """Keep a finished job's speed in the preferences (saved with them), for the estimates
    of the next session's first jobs; ``ran_on``: the device it ran on ("" unknown)."""
    prefs = _prefs()
    if prefs is None or not hasattr(prefs, "job_speeds"):
        return
    saved = saved_speeds()
    speeds = saved["speeds"]
    speeds.pop(speed_key(model, device), None)  # the latest last
    speeds[speed_key(model, device)] = float(seconds_per_unit)
    saved["speeds"] = dict(list(speeds.items())[-SPEEDS_KEPT:])
    if ran_on:
        saved["devices"][device] = ran_on
    prefs.job_speeds = json.dumps(saved, sort_keys=False)
    with contextlib.suppress(AttributeError):
        bpy.context.preferences.is_dirty = True  # auto-saved with the preferences


def estimate_job(
    frames: int, steps: int, width: int, height: int, model: str, device: str
) -> tuple[float | None, str]:
    """Seconds a job should take, and what the figure rests on: the last job with this
    model and device (this session or an earlier one), else this session's last job,
    else a rough figure for the device; (None, "") when nothing is known."""
    units = job_units(frames, steps, width, height)
    saved = saved_speeds()
    speed = saved["speeds"].get(speed_key(model, device))
    if speed is None:
        speed = RUNNER.seconds_per_unit
    if speed is not None:
        return float(speed) * units, LAST_SPEED
    ran_on = device if device != "auto" else saved["devices"].get(device, "")
    rough = ROUGH_SECONDS_PER_UNIT.get(ran_on.split(":")[0])
    if rough is None or model.startswith("builtin:"):
        return None, ""
    return rough * units, f"(a rough figure for {ran_on.upper()} until a job has run)"


def progress_text(job: ActiveJob, message: dict[str, Any]) -> str:
    """The status line of a ``progress`` message.

    Denoising counts the job's steps from the overall fraction, never going back (text to
    video denoises frame 1 alone, then all frames: two runs of the backend's own step
    counter); writing counts the frames written.
    """
    stage = message.get("stage") or "denoising"
    frames = int(message.get("frames_total") or job.job.get("frames") or 0)
    if stage == "denoising":
        steps = int(job.job.get("steps") or message.get("total") or 0)
        fraction = float(message.get("fraction") or 0.0)
        step = math.ceil(min(1.0, fraction / DENOISE_SHARE) * steps - 1e-9)
        job.step_shown = max(job.step_shown, min(steps, step))
        what = f"{frames} frames" if frames else "frames"
        return f"Denoising {what}: step {job.step_shown} of {steps}"
    if stage == "decoding":
        return f"Writing frames: {int(message.get('frames_done') or 0)} of {frames}"
    if stage == "detecting":  # the control video's frames through a detector, before denoising
        return f"Detecting control frames: {message.get('step')} of {message.get('total')}"
    return f"{stage}: step {message.get('step')} of {message.get('total')}"


def measured_speed(job: ActiveJob, units: float, now: float) -> float:
    """Seconds per work unit of a job that ended at ``now``: from its first progress
    message (the worker's start and the model's loading left out), scaled by the share of
    the job still ahead then; from its submission when no progress came."""
    since, fraction = job.clock or (job.started, 0.0)
    return (now - since) / (units * max(1.0 - fraction, 0.05))


def ran_on(job: dict[str, Any]) -> str:
    """The device a finished job ran on ("cpu", "cuda"), from its run.json; "" unknown."""
    try:
        info = json.loads((Path(job["out"]) / "run.json").read_text(encoding="utf-8"))
    except (OSError, KeyError, TypeError, ValueError):
        return ""
    return str(info.get("device") or "").split(":")[0] if isinstance(info, dict) else ""


class Runner:
    """Owns the worker process and the one job in flight."""

    def __init__(self) -> None:
        self.client: WorkerClient | None = None
        self.client_key: tuple[str, tuple[tuple[str, str], ...]] | None = None
        self.ready = False
        self.job: ActiveJob | None = None
        self.outcome: Outcome | None = None
        self.previews: Any = None
        self.preview_key = ""
        self._dead_since: float | None = None
        # list_models / remove_model requests waiting for their reply: id -> model or "".
        self.cache_requests: dict[str, str] = {}
        # preview_detector requests waiting for their picture: id -> detector.
        self.detector_requests: dict[str, str] = {}
        # Jobs submitted while another ran, started in order as each job ends.
        self.queue: list[QueuedJob] = []
        # How the jobs of this session ended, oldest first (the queue's jobs included).
        self.history: list[Outcome] = []
        # Seconds per work unit of the last finished job on this worker (job_units).
        self.seconds_per_unit: float | None = None

    # ------------------------------------------------------------------ worker

    @property
    def busy(self) -> bool:
        """True while a job is in flight."""
        return self.job is not None

    @property
    def worker_alive(self) -> bool:
        """True while a worker process runs."""
        return self.client is not None and self.client.alive

    def ensure_worker(self, python: str | Path, env: dict[str, str] | None = None) -> WorkerClient:
        """The running worker for this python and environment, started if needed."""
        key = (str(python), tuple(sorted((env or {}).items())))
        if self.client is not None and self.client.alive and self.client_key == key:
            return self.client
        self.stop_worker()
        client = WorkerClient(python, env=env)
        client.start()
        self.client, self.client_key, self.ready = client, key, False
        self._dead_since = None
        _status().worker_pid = client.pid or 0
        return client

    def stop_worker(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit (the next job starts a new one)."""
        client, self.client, self.client_key, self.ready = self.client, None, None, False
        if client is not None:
            client.shutdown(timeout=timeout)
        with contextlib.suppress(AttributeError):
            _status().worker_pid = 0

    # ------------------------------------------------------------------ jobs

    def submit(
        self,
        job: dict[str, Any],
        *,
        scene: str,
        above: int,
        start: int,
        name: str,
        python: str | Path,
        env: dict[str, str] | None = None,
        staging: Path | None = None,
        allow_pickle: bool = False,
        take_group: str = "",
        source: str = "",
        queue: bool = False,
        job_id: str = "",
    ) -> str:
        """Send ``job`` to the worker; the result lands above channel ``above`` at ``start``.

        ``allow_pickle`` comes from the preference, never from the job (see protocol).
        ``take_group``: the result is a new take of that group (empty: a new group);
        ``source``: the name of the strip the job reads. While a job runs, ``queue`` adds
        this one to the queue (started when the jobs before it end) instead of refusing it.
        """
        job_id = job_id or uuid.uuid4().hex[:12]
        if self.busy:
            if not queue:
                raise RunnerBusyError("a job is already running: cancel it first")
            self.queue.append(
                QueuedJob(
                    job_id, job, scene, above, start, name, python, env, staging,
                    allow_pickle, take_group, source,
                )
            )  # fmt: skip
            ensure_timer()
            _redraw()
            return job_id
        sweep_partials(job.get("out"))
        client = self.ensure_worker(python, env)
        try:
            client.generate(job_id, job, allow_pickle=allow_pickle)
        except WorkerError:
            # It died since the last job: start a fresh one and try once more.
            self.stop_worker(timeout=1.0)
            client = self.ensure_worker(python, env)
            try:
                client.generate(job_id, job, allow_pickle=allow_pickle)
            except WorkerError as exc:
                self.client, self.client_key = None, None
                client.close(timeout=2.0)  # ended, its stderr read to the end
                raise WorkerError(self._exit_text(client, client.returncode)) from exc
        self.job = ActiveJob(
            job_id, job, scene, above, start, name, staging, take_group=take_group, source=source
        )
        self.outcome = None
        status = _status()
        status.state = "RUNNING" if self.ready else "STARTING"
        status.progress = 0.0
        status.error = ""
        status.preview_path = ""
        status.message = "Running" if self.ready else "Starting the backend..."
        _wm_progress("begin")
        ensure_timer()
        _redraw()
        return job_id

    def _send(
        self, python: str | Path, env: dict[str, str] | None, kind: str, /, **payload: Any
    ) -> None:
        """Send one request, starting the worker (once more if it had died) as needed."""
        client = self.ensure_worker(python, env)
        try:
            client.send(kind, **payload)
        except WorkerError:
            self.stop_worker(timeout=1.0)
            self.ensure_worker(python, env).send(kind, **payload)

    def fetch(
        self,
        model: str,
        *,
        python: str | Path,
        env: dict[str, str] | None = None,
        kind: str = "model",
        allow_pickle: bool = False,
    ) -> str:
        """Download hub id ``model`` ahead of the first job; progress and cancel as a job's.

        ``kind``: "model" (or "controlnet"), "lora" or "embedding" (the protocol's
        FETCH_KINDS); ``allow_pickle`` lets pickled weights download (the preference).
        """
        if self.busy:
            raise RunnerBusyError("a job is already running: cancel it first")
        job_id = uuid.uuid4().hex[:12]
        extra: dict[str, Any] = {"kind": kind} if kind != "model" else {}
        if allow_pickle:
            extra["allow_pickle"] = True
        self._send(python, env, "fetch_model", id=job_id, model=model, **extra)
        self.job = ActiveJob(job_id, {"model": model}, "", 0, 0, model, kind="fetch")
        self.outcome = None
        status = _status()
        status.state = "RUNNING"
        status.progress = 0.0
        status.error = ""
        status.message = f"Downloading {model}..."
        _wm_progress("begin")
        ensure_timer()
        _redraw()
        return job_id

    def list_models(self, *, python: str | Path, env: dict[str, str] | None = None) -> str:
        """Ask the worker which models its hub cache holds (the answer fills the status)."""
        request_id = uuid.uuid4().hex[:12]
        self._send(python, env, "list_models", id=request_id)
        self.cache_requests[request_id] = ""
        _status().cache_message = "Listing downloaded models..."
        ensure_timer()
        return request_id

    def remove_model(
        self, model: str, *, python: str | Path, env: dict[str, str] | None = None
    ) -> str:
        """Delete ``model`` from the worker's hub cache (after the job in flight, if any)."""
        request_id = uuid.uuid4().hex[:12]
        self._send(python, env, "remove_model", id=request_id, model=model)
        self.cache_requests[request_id] = model
        _status().cache_message = f"Removing {model}..."
        ensure_timer()
        return request_id

    def preview_detector(
        self,
        request: dict[str, Any],
        *,
        python: str | Path,
        env: dict[str, str] | None = None,
        allow_pickle: bool = False,
    ) -> str:
        """Ask the worker for one control frame through a detector (a ``preview_detector``
        request: control, detector, frame, width, height, fit); the picture it answers
        with is shown in the panel's preview. Queued behind a running job."""
        request_id = uuid.uuid4().hex[:12]
        extra = {"allow_pickle": True} if allow_pickle else {}
        self._send(python, env, "preview_detector", id=request_id, **request, **extra)
        self.detector_requests[request_id] = str(request.get("detector", ""))
        status = _status()
        if not self.busy:
            status.message = f"Previewing the {request.get('detector')} detector..."
            status.error = ""
        ensure_timer()
        _redraw()
        return request_id

    def _apply_detector_reply(self, message: dict[str, Any]) -> None:
        """A reply to preview_detector: show its picture, its download or its error."""
        request_id = str(message.get("id"))
        kind = message.get("type")
        status = _status()
        if kind == "download":
            if not self.busy:
                status.message = f"Detector weights: {download_text(message)}"
            _redraw()
            return
        detector = self.detector_requests.pop(request_id, "")
        if kind == "detected":
            self._show_preview(str(message.get("path") or ""))
            if not self.busy:
                status.message = f"Detector preview: {detector}"
        elif kind == "error":
            status.error = (
                f"Detector preview failed: {message.get('kind', 'Error')}: "
                f"{message.get('message', '')}"
            )
            if not self.busy:
                status.message = ""
        elif kind == "cancelled" and not self.busy:
            status.message = "Detector preview cancelled"
        _redraw()

    def _apply_cache_reply(self, message: dict[str, Any]) -> None:
        """A reply to list_models or remove_model: update the preferences' model list."""
        status = _status()
        model = self.cache_requests.pop(str(message.get("id")), "")
        kind = message.get("type")
        if kind == "models":
            status.cached_models.clear()
            for entry in message.get("models") or []:
                item = status.cached_models.add()
                item.model = str(entry.get("model", ""))
                item.size = float(entry.get("size") or 0)
                item.complete = bool(entry.get("complete"))
            status.cache_dir = str(message.get("cache_dir") or "")
            status.cache_listed = True
            status.cache_message = ""
        elif kind == "removed":
            freed = format_bytes(float(message.get("freed") or 0))
            status.cache_message = f"Removed {model} ({freed} freed)"
            for i, item in enumerate(status.cached_models):
                if item.model == model:
                    status.cached_models.remove(i)
                    break
        elif kind == "error":
            status.cache_message = f"{message.get('kind', 'Error')}: {message.get('message', '')}"
        _redraw()

    def cancel(self) -> bool:
        """Ask the worker to stop the job after its current step; False when none runs."""
        if self.job is None:
            return False
        if self.job.cancel_at is None:
            self.job.cancel_at = time.monotonic()
            try:
                assert self.client is not None
                self.client.cancel(self.job.id)
            except (WorkerError, AssertionError):
                self._finish("WARNING", "Cancelled (the worker had stopped)")
                self.stop_worker(timeout=1.0)
                return True
            status = _status()
            status.state = "CANCELLING"
            status.message = "Cancelling..."
            _redraw()
        return True

    def estimate(self, frames: int, steps: int, width: int, height: int) -> float | None:
        """Seconds a job of this size should take, from the last job's speed; None before
        any job finished."""
        if self.seconds_per_unit is None:
            return None
        return self.seconds_per_unit * job_units(frames, steps, width, height)

    def outputs(self) -> list[str]:
        """The output folders of the job in flight and the queued ones (not written yet)."""
        jobs = ([self.job.job] if self.job is not None else []) + [q.job for q in self.queue]
        return [str(j["out"]) for j in jobs if j.get("out")]

    def cancel_queued(self, job_id: str) -> bool:
        """Drop a queued job (and its staged inputs); False when no queued job has that id."""
        for i, queued in enumerate(self.queue):
            if queued.id == job_id:
                del self.queue[i]
                remove_tree(queued.staging)
                _redraw()
                return True
        return False

    def clear_queue(self) -> None:
        """Drop every queued job."""
        while self.queue:
            self.cancel_queued(self.queue[0].id)

    def _start_next(self) -> None:
        """Start the first queued job once nothing runs; one that cannot start says why."""
        while self.job is None and self.queue:
            queued = self.queue.pop(0)
            try:
                self.submit(
                    queued.job,
                    scene=queued.scene,
                    above=queued.above,
                    start=queued.start,
                    name=queued.name,
                    python=queued.python,
                    env=queued.env,
                    staging=queued.staging,
                    allow_pickle=queued.allow_pickle,
                    take_group=queued.take_group,
                    source=queued.source,
                    job_id=queued.id,
                )
            except (
                WorkerError,
                RunnerBusyError,
                OSError,
                backend_paths.BackendNotFoundError,
            ) as exc:
                remove_tree(queued.staging)
                self.outcome = Outcome(queued.id, "ERROR", f"Could not start a queued job: {exc}")
                self.history = [*self.history[-(HISTORY - 1) :], self.outcome]
                _status().error = self.outcome.message

    def wait(self, timeout: float, interval: float = 0.05) -> Outcome | None:
        """Step until the job in flight ends (for scripts and tests: no event loop there)."""
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            self.step()
            time.sleep(interval)
        return None if self.busy else self.outcome

    def wait_all(self, timeout: float, interval: float = 0.05) -> list[Outcome]:
        """Step until the job in flight and every queued job have ended; their outcomes."""
        deadline = time.monotonic() + timeout
        seen = len(self.history)
        while (self.busy or self.queue) and time.monotonic() < deadline:
            self.step()
            time.sleep(interval)
        return self.history[seen:]

    # ------------------------------------------------------------------ the step

    def step(self) -> float | None:
        """Apply the worker's queued messages; the delay until the next step, None to stop."""
        client = self.client
        if client is not None:
            for message in client.poll():
                self._apply(client, message)
                if self.client is not client:
                    break
            if self.client is client and not client.alive:
                # The reader thread reports the exit once stdout closes; do not wait forever.
                now = time.monotonic()
                self._dead_since = self._dead_since or now
                if now - self._dead_since > DEAD_GRACE:
                    self._worker_exited(client, client.returncode)
        job = self.job
        if (
            job is not None
            and job.cancel_at is not None
            and time.monotonic() - job.cancel_at > CANCEL_TIMEOUT
        ):
            if self.client is not None:
                self.client.kill()
            self.client = None
            self._finish(
                "WARNING",
                "Cancelled: the worker did not stop in time and was ended; "
                "a new one starts with the next job",
            )
        if self.job is None and self.queue:
            self._start_next()
        if self.job is not None or self.queue:
            return INTERVAL_BUSY
        return INTERVAL_IDLE if self.client is not None else None

    def _apply(self, client: WorkerClient, message: dict[str, Any]) -> None:
        kind = message.get("type")
        job = self.job
        if kind == EXITED:
            self._worker_exited(client, message.get("returncode"))
            return
        if kind == NOISE:
            return
        if kind == "ready":
            self.ready = True
            status = _status()
            status.worker_pid = int(message.get("pid") or client.pid or 0)
            if job is not None and status.state == "STARTING":
                status.state = "RUNNING" if job.cancel_at is None else "CANCELLING"
                status.message = "Running"
            _redraw()
            return
        if message.get("id") in self.cache_requests:
            self._apply_cache_reply(message)
            return
        if message.get("id") in self.detector_requests:
            self._apply_detector_reply(message)
            return
        if job is None or message.get("id") != job.id:
            return  # a late message of an earlier job
        status = _status()
        if kind == "accepted":
            self.ready = True
            if job.cancel_at is None:
                status.state = "RUNNING"
                status.message = "Running"
        elif kind == "progress":
            fraction = float(message.get("fraction") or 0.0)
            if job.clock is None:
                job.clock = (time.monotonic(), fraction)
            status.progress = max(status.progress, min(1.0, max(0.0, fraction)))
            if job.cancel_at is None:
                status.message = progress_text(job, message)
            _wm_progress("update", status.progress)
        elif kind == "download":
            total = float(message.get("bytes_total") or 0)
            if total > 0:
                status.progress = min(1.0, float(message.get("bytes_done") or 0) / total)
                _wm_progress("update", status.progress)
            if job.cancel_at is None:
                status.message = download_text(message)
        elif kind == "fetched":
            model = str(message.get("model") or job.name)
            self._finish("INFO", f"Downloaded {model}")
            status.progress = 1.0
            if self.client is not None:  # refresh the preferences' list of downloaded models
                request_id = uuid.uuid4().hex[:12]
                with contextlib.suppress(WorkerError):
                    self.client.send("list_models", id=request_id)
                    self.cache_requests[request_id] = ""
        elif kind == "preview":
            self._show_preview(str(message.get("path") or ""))
        elif kind == "done":
            if job.cancel_at is not None:
                # Finished before the cancel arrived: the user asked for nothing, so the
                # folder this job created goes away again.
                remove_tree(Path(job.job["out"]))
                remove_tree(job.staging)
                self._finish("INFO", "Cancelled")
            else:
                frames = [str(p) for p in message.get("frames") or []]
                if frames:  # preview paths pointed into the folder renamed on success
                    self._show_preview(frames[-1])
                self._add_result(job, frames)
        elif kind == "error":
            text = f"{message.get('kind', 'Error')}: {message.get('message', '')}"
            traceback = message.get("traceback")
            if traceback:
                print(f"T2VZ backend error in job {job.id}:\n{traceback}", file=sys.stderr)
            remove_tree(job.staging)
            if job.cancel_at is not None:
                self._finish("INFO", "Cancelled")
            else:
                what = "Download" if job.kind == "fetch" else "Generation"
                self._finish("ERROR", f"{what} failed: {text}")
        elif kind == "cancelled":
            remove_tree(job.staging)
            self._finish("INFO", "Cancelled")
        _redraw()

    def _worker_exited(self, client: WorkerClient, returncode: Any) -> None:
        if self.client is not client:
            return
        text = self._exit_text(client, returncode)
        tail = client.stderr_tail(8).strip().splitlines()
        self.client, self.client_key, self.ready = None, None, False
        status = _status()
        status.worker_pid = 0
        print(f"T2VZ: {text}\n" + "\n".join(tail), file=sys.stderr)
        if self.job is not None:
            cancelled = self.job.cancel_at is not None
            remove_tree(self.job.staging)
            sweep_partials(self.job.job.get("out"))  # the worker died while writing it
            self._finish("INFO" if cancelled else "ERROR", "Cancelled" if cancelled else text)
        else:
            status.message = text
        _redraw()

    def _exit_text(self, client: WorkerClient, returncode: Any) -> str:
        """What to tell the user when the worker ended: crashed, or never started."""
        tail = client.stderr_tail(8).strip().splitlines()
        last = f": {tail[-1]}" if tail else ""
        if self.ready and self.client is client:
            return (
                f"The backend worker stopped ({exit_text(returncode)}){last}. "
                "A new one starts with the next job"
            )
        return (
            f"The backend failed to start ({exit_text(returncode)}){last}. Check "
            "'Backend Python' in the add-on's preferences, or click 'Install Backend'"
        )

    def _add_result(self, job: ActiveJob, frames: list[str]) -> None:
        spec = job.job
        with contextlib.suppress(KeyError, TypeError, ValueError, ZeroDivisionError):
            units = job_units(len(frames), spec["steps"], spec["width"], spec["height"])
            self.seconds_per_unit = measured_speed(job, units, time.monotonic())
            remember_speed(
                str(spec["model"]), str(spec["device"]), ran_on(spec), self.seconds_per_unit
            )
        scene = bpy.data.scenes.get(job.scene)
        if scene is None:
            self._finish(
                "WARNING", f"Scene {job.scene!r} is gone; the frames are in {job.job['out']}"
            )
            return
        try:
            editor = scene.sequence_editor_create()
            channel = strips.result_channel(editor, job.start, job.start + len(frames), job.above)
            group = job.take_group or uuid.uuid4().hex[:12]
            number = 1 + max((strips.take_of(s)[1] for s in strips.takes(editor, group)), default=0)
            name = strips.take_name(job.name, number)
            strip = strips.add_result_strip(scene, frames, channel, job.start, name, job.job)
            strips.mark_take(strip, group, number)
            if job.source:
                strip[strips.SOURCE_PROPERTY] = job.source
            strips.mute_other_takes(editor, strip)
            strips.select_only(editor, strip)
            strips.relative_directory(strip)
            strips.relative_job(strip)
        except (strips.StripInputError, RuntimeError, TypeError) as exc:
            self._finish(
                "ERROR", f"Could not add the result strip: {exc}; frames in {job.job['out']}"
            )
            return
        try:
            if bpy.ops.ed.undo_push.poll():
                bpy.ops.ed.undo_push(message="T2VZ: add generated strip")
        except RuntimeError:
            pass
        self._finish(
            "INFO",
            f"Added {strip.name!r}: {len(frames)} frames on channel {channel} at frame {job.start}",
            strip_name=strip.name,
            frames=frames,
        )
        status = _status()
        status.result_strip, status.result_scene = strip.name, scene.name

    def _finish(
        self,
        level: str,
        message: str,
        strip_name: str | None = None,
        frames: list[str] | None = None,
    ) -> None:
        job = self.job
        self.job = None
        self.outcome = Outcome(job.id if job else "", level, message, strip_name, frames or [])
        self.history = [*self.history[-(HISTORY - 1) :], self.outcome]
        status = _status()
        status.state = "IDLE"
        status.message = message if level != "ERROR" else ""
        status.error = message if level == "ERROR" else ""
        status.result_strip = status.result_scene = ""
        # A result fills the bar; a cancelled or failed job empties it.
        status.progress = 1.0 if level == "INFO" and strip_name else 0.0
        _wm_progress("end")
        if level == "ERROR":
            print(f"T2VZ: {message}", file=sys.stderr)

    # ------------------------------------------------------------------ preview

    def _show_preview(self, path: str) -> None:
        if not path or not Path(path).is_file():
            return
        status = _status()
        status.preview_path = path
        if self.previews is None:
            self.previews = bpy.utils.previews.new()
        self.previews.clear()
        self.preview_key = path
        self.previews.load(path, path, "IMAGE")

    def show_preview(self, path: str) -> None:
        """Show a picture (a control pass, a finished frame) in the panel's preview."""
        self._show_preview(path)

    def preview_icon_id(self) -> int:
        """The icon id of the latest finished frame, 0 when there is none."""
        if self.previews is None or self.preview_key not in self.previews:
            return 0
        return self.previews[self.preview_key].icon_id

    # ------------------------------------------------------------------ teardown

    def shutdown(self) -> None:
        """Stop the worker, drop the previews: called on unregister."""
        self.clear_queue()
        self.job = None
        self.stop_worker(timeout=3.0)
        if self.previews is not None:
            bpy.utils.previews.remove(self.previews)
            self.previews = None
        self.preview_key = ""


class Installer:
    """``install_deps.py`` running in the background, its output shown in the preferences."""

    def __init__(self) -> None:
        self.proc: LineProcess | None = None
        self.last_line = ""

    @property
    def running(self) -> bool:
        """True while the installer runs."""
        return self.proc is not None

    def start(
        self,
        venv: Path,
        torch: str = "auto",
        script: Path | None = None,
        detectors: bool = False,
        cluster: bool = False,
    ) -> None:
        """Run the installer with Blender's python, creating the environment at ``venv``.

        ``detectors``: also install the pickled extra detectors (``--detectors``);
        ``cluster``: also install Ray, for jobs on a Ray cluster (``--cluster``).
        """
        if self.proc is not None:
            raise RunnerBusyError("the installer is already running")
        script = script or backend_paths.install_script()
        if not script.is_file():
            raise FileNotFoundError(f"install script not found: {script}")
        argv = [sys.executable, str(script), "--venv", str(venv), "--torch", torch]
        if detectors:
            argv.append("--detectors")
        if cluster:
            argv.append("--cluster")
        proc = LineProcess(argv, cwd=script.parent)
        proc.start()
        self.proc = proc
        self.last_line = ""
        status = _status()
        status.install_running = True
        status.install_error = ""
        status.install_message = f"Installing into {venv}..."
        ensure_timer()

    def cancel(self) -> None:
        """Stop the installer."""
        if self.proc is not None:
            self.proc.kill()

    def step(self) -> bool:
        """Apply the installer's output; True while it still runs."""
        proc = self.proc
        if proc is None:
            return False
        status = _status()
        for message in proc.poll():
            if message["type"] == EXITED:
                code = message.get("returncode")
                self.proc = None
                capabilities.forget()  # the environment may have new packages now
                status.install_running = False
                if code == 0:
                    status.install_message = "Backend installed"
                else:
                    tail = [self.last_line] if self.last_line else []
                    tail = proc.stderr_tail(3).strip().splitlines() or tail or ["no output"]
                    status.install_error = f"Install failed ({exit_text(code)}): {tail[-1]}"
                    status.install_message = ""
                break
            line = str(message.get("text", ""))
            self.last_line = line
            # install_deps.py marks its progress lines; pip's own output is only kept
            # for the error message.
            if line.startswith(INSTALL_PREFIX):
                status.install_message = line[len(INSTALL_PREFIX) :].strip()[:200]
        _redraw()
        return self.proc is not None


RUNNER = Runner()
INSTALLER = Installer()


def _timer() -> float | None:
    interval = RUNNER.step()
    if INSTALLER.step():
        interval = INTERVAL_BUSY if interval is None else min(interval, INTERVAL_BUSY)
    return interval


@bpy.app.handlers.persistent
def forget_removed_result(*_args: Any) -> None:
    """After undo, redo or loading a file: a status naming a result strip that is gone no
    longer claims it (undo removes the strip Generate added)."""
    status = _status()
    if not status.result_strip:
        return
    scene = bpy.data.scenes.get(status.result_scene)
    editor = scene.sequence_editor if scene is not None else None
    if editor is None or strips.every_strip(editor).get(status.result_strip) is None:
        status.result_strip = status.result_scene = ""
        status.message = ""
        status.progress = 0.0
        _redraw()


@bpy.app.handlers.persistent
def relative_results(filepath: Any = "", *_args: Any) -> None:
    """Before a save: result strips made while the file was unsaved (or with Relative Paths
    off at the time) are stored relative to the file, following Blender's preference; so
    are the input paths in their jobs (source video, controls, masks), which Blender does
    not know of, and which a Save As elsewhere remaps. Folders only on a first save or a
    save in place: Save As elsewhere remaps the strips' own relative paths itself."""
    target = filepath if isinstance(filepath, str) else ""
    if not target:
        return
    moving = bool(bpy.data.filepath) and bpy.data.filepath != target
    for scene in bpy.data.scenes:
        editor = scene.sequence_editor
        if editor is None:
            continue
        for strip in strips.every_strip(editor):
            if strips.stored_job(strip) is None:
                continue
            strips.relative_job(strip, target)
            if not moving and strip.type == "IMAGE":
                strips.relative_directory(strip, target)


_HANDLERS = {
    "undo_post": forget_removed_result,
    "redo_post": forget_removed_result,
    "load_post": forget_removed_result,
    "save_pre": relative_results,
}


def register() -> None:
    """Watch undo, redo and file loads for a result strip that went away."""
    for name, handler in _HANDLERS.items():
        handlers = getattr(bpy.app.handlers, name)
        if handler not in handlers:
            handlers.append(handler)


def ensure_timer() -> None:
    """Make sure the step timer runs (it stops itself when there is nothing to watch)."""
    if not bpy.app.timers.is_registered(_timer):
        bpy.app.timers.register(_timer, first_interval=INTERVAL_BUSY, persistent=True)


def step() -> float | None:
    """One step of the runner and the installer, as the timer runs it."""
    return _timer()


def unregister() -> None:
    """Stop the timer, the installer and the worker."""
    for name, handler in _HANDLERS.items():
        handlers = getattr(bpy.app.handlers, name)
        while handler in handlers:
            handlers.remove(handler)
    if bpy.app.timers.is_registered(_timer):
        bpy.app.timers.unregister(_timer)
    INSTALLER.cancel()
    INSTALLER.proc = None
    RUNNER.shutdown()
