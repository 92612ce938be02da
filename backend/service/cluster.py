"""Runs a job's frames on a Ray cluster: shards on GPU actors, frames back to the caller.

A frame depends only on (seed, its index, frame 1) (paper Sect. 3.3; DESIGN.md "Long
videos"), so a job splits into frame ranges that each also compute frame 1, the anchor,
and reassemble into the local result. The submitting side checks the job and reads its
inputs exactly as a local run does (bad inputs fail before anything is dispatched, with the
same message), sends input frames and local model/adapter files through Ray's object store
as plain arrays and bytes, and writes the frames that come back into the same staged
output as ``runner.run_job``: the folder, ``job.json`` and the mp4 are a local run's.

Ray supplies the cluster (actors that keep models loaded, the object store, token
authentication); nothing here schedules beyond handing each free actor the next shard.
Ray is optional: this module imports it only when a cluster address is given.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import ipaddress
import json
import logging
import math
import os
import platform
import queue
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..engine.pipeline import Callbacks, Cancelled, ControlInput, TextToVideoZero
from ..media.controls import store_control_frames
from ..media.detectors import DetectorRun, weights_used
from ..media.video_io import (
    FrameStore,
    Mp4Writer,
    OutputExistsError,
    _read_image,
    check_output_writable,
    frame_name,
    staged_output,
    store_frames,
    write_file,
    write_png,
    writing,
)
from ..models.adapters import applied_adapters, convert_prompt
from ..models.hub import DownloadHooks
from ..models.loading import ModelCache, choose_dtype, resolve_device
from ..models.tiny import ALL_TINY_KINDS, BUILTIN_PREFIX
from ..protocol import Job, validate_job
from .runner import (
    DECODE_SLICE,
    JobEvents,
    JobResult,
    check_families,
    input_aspect,
    job_size,
    load_models,
    native_side,
)

log = logging.getLogger(__name__)

ENV_ADDRESS = "T2VZ_CLUSTER"  # the cluster address when --cluster is not given
ENV_TOKEN = "T2VZ_CLUSTER_TOKEN"  # its token (Ray's own RAY_AUTH_TOKEN works too)
ENV_SHARD_SIZE = "T2VZ_CLUSTER_SHARD_SIZE"  # frames per shard when --shard-size is not given
NAMESPACE = "t2vz"  # Ray namespace of the shared actors
# The budget for "the cluster cannot be reached": a clear error within 15 s.
CONNECT_TIMEOUT_S = 15.0
# A TCP probe of the head's port comes first: an unreachable host fails in this time.
PROBE_TIMEOUT_S = 5.0
# After cancel, how long the shards get to stop before the job ends regardless.
CANCEL_WAIT_S = 5.0
# A shard whose actor dies is resubmitted this many times in all before the job fails.
SHARD_ATTEMPTS = 3
# Generate calls an actor accepts at once: one runs (a lock), the rest wait; cancel and
# describe calls run beside them, so this must exceed the jobs that queue on one actor.
ACTOR_CONCURRENCY = 16
# A base model given as a local path is sent to the workers up to this size (the tiny and
# shapes models, a pruned fp16 checkpoint); larger ones are refused with what to do instead.
MAX_SENT_MODEL_BYTES = 4 << 30
BACKEND_DIR = Path(__file__).resolve().parents[1]
# Source frames the engine VAE-encodes in one call (TextToVideoZero._encode_images' batch):
# pix2pix shards align to it too (see plan_shards).
PIX2PIX_ENCODE_BATCH = 4
LOOPBACK_NAMES = ("localhost",)


class ClusterError(RuntimeError):
    """The cluster cannot be used for this job: unreachable, refused, or a worker failed."""


@dataclass
class ClusterConfig:
    """Where a job's shards go and how finely it is split."""

    address: str  # host:port of the Ray head (GCS), as `ray start --head` prints it
    token: str | None = None  # Ray's auth token; required for a non-loopback address
    # Frames per shard; None: the job's frames over the workers the cluster has now.
    shard_size: int | None = None


def config_from_env(
    address: str | None, token: str | None = None, shard_size: int | None = None
) -> ClusterConfig | None:
    """The cluster to use: the given address or $T2VZ_CLUSTER; None runs locally."""
    address = address or os.environ.get(ENV_ADDRESS) or None
    if not address:
        return None
    token = token or os.environ.get(ENV_TOKEN) or os.environ.get("RAY_AUTH_TOKEN") or None
    if shard_size is None:
        shard_size = shard_size_from_env()
    return ClusterConfig(address.strip(), token, shard_size)


def shard_size_from_env() -> int | None:
    """$T2VZ_CLUSTER_SHARD_SIZE as frames per shard (unset or empty: None, automatic)."""
    text = os.environ.get(ENV_SHARD_SIZE, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ClusterError(f"${ENV_SHARD_SIZE} must be a whole number of frames >= 1, got {text!r}")
    return value


# --------------------------------------------------------------------------- addresses


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of ``host:port`` (``ray://`` and IPv6 ``[::1]:port`` accepted)."""
    text = address.strip()
    if text.startswith("ray://"):
        raise ClusterError(
            f"cluster address {address!r}: Ray Client (ray://) is not supported; give the "
            "head's GCS address host:port (port 6379 unless `ray start --head --port` chose one)"
        )
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"cluster address must be host:port, got {address!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def has_token(config: ClusterConfig) -> bool:
    """Whether a token will be presented: the config's, or Ray's environment variables."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return bool(config.token or os.environ.get("RAY_AUTH_TOKEN") or (path and Path(path).is_file()))


def check_config(config: ClusterConfig) -> tuple[str, int]:
    """Refuse what must not be tried: a malformed address, a remote one without a token."""
    host, port = split_address(config.address)
    if not is_loopback(host) and not has_token(config):
        raise ClusterError(
            f"cluster {config.address}: refusing a non-loopback address without a token. "
            "Whoever can reach a Ray cluster can run code on it, so its token authentication "
            "must be on: give the head's token (--cluster-token, $T2VZ_CLUSTER_TOKEN or the "
            "add-on preference; `ray get-auth-token` on the head prints it)"
        )
    if config.shard_size is not None and config.shard_size < 1:
        raise ClusterError(f"shard size must be at least 1, got {config.shard_size}")
    return host, port


# --------------------------------------------------------------------------- connecting

_connected: tuple[str, str | None] | None = None
_connect_lock = threading.Lock()


def import_ray() -> Any:
    """The ray module, or a ClusterError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ClusterError(
            "Ray is not installed in the backend environment: run "
            "`python3 install_deps.py --cluster` (or tick Cluster in the add-on preferences)"
        ) from exc
    return ray


def _probe(host: str, port: int, timeout: float) -> None:
    """Open and close a TCP connection to the head: fails fast for an unreachable cluster."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ClusterError(
            f"Ray cluster {host}:{port} is unreachable ({exc.strerror or exc}): is "
            "`ray start --head` running there, and is the port open to this machine?"
        ) from exc


def connect(config: ClusterConfig) -> Any:
    """Connect this process to the cluster (once; again when the address changes); the ray
    module. ClusterError within CONNECT_TIMEOUT_S when it cannot be reached or refuses."""
    global _connected
    host, port = check_config(config)
    ray = import_ray()
    key = (config.address, config.token)
    with _connect_lock:
        if ray.is_initialized() and _connected == key:
            return ray
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        _probe(host, port, PROBE_TIMEOUT_S)  # before leaving a cluster that works
        if ray.is_initialized():
            ray.shutdown()
        _connected = None
        _handles.clear()
        os.environ["RAY_AUTH_MODE"] = "token"  # never a cluster without authentication
        if config.token:
            os.environ["RAY_AUTH_TOKEN"] = config.token
        with contextlib.suppress(Exception):  # Ray caches its config and the token it read
            from ray._raylet import AuthenticationTokenLoader, Config

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()
        outcome: list[BaseException | None] = []

        def init() -> None:
            try:
                ray.init(
                    address=f"{host}:{port}",
                    namespace=NAMESPACE,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                    # The workers run this very backend code, sent with the job (Ray
                    # caches it by content): no shared file system, no version skew.
                    runtime_env={"py_modules": [str(BACKEND_DIR)]},
                )
                outcome.append(None)
            except BaseException as exc:  # reported by the caller's thread
                outcome.append(exc)

        thread = threading.Thread(target=init, daemon=True, name="t2vz-ray-connect")
        thread.start()
        thread.join(max(0.0, deadline - time.monotonic()))
        if not outcome:
            raise ClusterError(
                f"Ray cluster {config.address} answered but did not accept this connection "
                f"within {CONNECT_TIMEOUT_S:.0f} s: is the token right (the head's "
                "`ray get-auth-token`), and is it a Ray head's port?"
            )
        if outcome[0] is not None:
            raise ClusterError(
                f"could not connect to Ray cluster {config.address}: {outcome[0]}"
            ) from outcome[0]
        _connected = key
        return ray


def cluster_info(config: ClusterConfig) -> dict[str, Any]:
    """What the cluster offers: GPUs, CPUs and live nodes (the add-on's Test Connection)."""
    ray = connect(config)
    total = ray.cluster_resources()
    free = ray.available_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {
        "address": config.address,
        "gpus": int(total.get("GPU", 0)),
        "free_gpus": int(free.get("GPU", 0)),
        "cpus": int(total.get("CPU", 0)),
        "nodes": [
            {
                "host": n.get("NodeManagerHostname", ""),
                "address": n.get("NodeManagerAddress", ""),
                "gpus": int(n.get("Resources", {}).get("GPU", 0)),
                "cpus": int(n.get("Resources", {}).get("CPU", 0)),
            }
            for n in nodes
        ],
    }


# --------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    """A contiguous range of the job's frames, computed with frame 1 on one actor."""

    frames: tuple[int, ...]  # 0-based frame indices it delivers, ascending
    # What the engine computes for it: the frames plus up to chunk_size - 1 frames of the
    # next shard that only fill its last chunk to the local run's shape (see plan_shards).
    computed: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        """Its frames as the user counts them (1-based)."""
        return f"frames {self.frames[0] + 1}-{self.frames[-1] + 1}"


def plan_shards(
    frame_ids: Sequence[int], shard_size: int, chunk_size: int, encode_batch: int = 1
) -> list[Shard]:
    """Split the job's frames into shards of about ``shard_size`` frames, each computed in
    UNet batches of exactly the local run's shape.

    A frame's bits depend on the shape of the batch it is computed in and its place there
    (measured on this CPU, torch 2.13: 1e-5 apart otherwise, enough to flip PNG bytes),
    not on the other frames in it. The local run chunks P = [0, f1, f2, ...] by
    ``chunk_size`` c. A shard starting at position q of P with q = 1 (mod c) computes
    [0, P[q], ...]: frame 1 takes the place of P[q - 1] in the first chunk and every later
    chunk is a local one; its last chunk is filled up with the next shard's first c - 1
    frames, computed and dropped. That costs c - 1 frames a shard for identical results.
    Pix2pix also VAE-encodes its source frames ``encode_batch`` at a time along P, so its
    shards align to both grids (their least common multiple). Frame 1's own batch is full
    in every shard: a last shard shorter than that joins the one before.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    processed = sorted(set(frame_ids) | {0})
    wanted = set(frame_ids)
    grid = math.lcm(chunk_size, encode_batch)
    step = max(1, math.ceil(shard_size / grid)) * grid
    starts = [0, *range(1 + step, len(processed), step)]
    if len(starts) > 1 and len(processed) - starts[-1] < grid - 1:
        starts.pop()  # a tail too short to fill frame 1's batch joins the shard before it
    ends = [*starts[1:], len(processed)]
    shards = []
    for a, b in zip(starts, ends, strict=True):
        frames = tuple(f for f in processed[a:b] if f in wanted)
        computed = tuple(f for f in processed[a : b + grid - 1] if f != 0)
        if frames:
            shards.append(Shard(frames, computed))
    return shards


def decode_groups(shard: Shard, job_frames: Sequence[int]) -> list[list[int]]:
    """The local run's VAE batches (DECODE_SLICE of the job's frames) that hold the shard's
    frames; a shard decodes each whole batch, with its own latents standing in for the
    frames it lacks, so every frame is decoded in the same batch shape as locally."""
    frames = list(job_frames)
    groups = [frames[i : i + DECODE_SLICE] for i in range(0, len(frames), DECODE_SLICE)]
    mine = set(shard.frames)
    return [group for group in groups if mine & set(group)]


def default_shard_size(frames: int, workers: int) -> int:
    """Frames per shard: the job over the workers, one shard each."""
    return max(1, math.ceil(frames / max(1, workers)))


# --------------------------------------------------------------------------- files as data


def _local_path(name: str | None) -> Path | None:
    """``name`` as an existing local file or folder, else None (a hub id or built-in name)."""
    if not name or name.startswith(BUILTIN_PREFIX):
        return None
    path = Path(os.path.expanduser(name))
    return path if path.exists() else None


def _files_of(path: Path) -> list[tuple[str, Path]]:
    """(relative name, file) of a file or of every file under a folder, in a stable order."""
    if path.is_file():
        return [(path.name, path)]
    return sorted(
        (str(p.relative_to(path)), p)
        for p in path.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


def _digest(files: list[tuple[str, Path]]) -> str:
    """A content hash of named files: the folder name they unpack to on the workers."""
    h = hashlib.sha256()
    for name, path in files:
        h.update(name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:24]


@dataclass
class PackedPath:
    """A local file or folder travelling as bytes: unpacked under its digest on a worker."""

    name: str  # the file or folder name
    is_file: bool
    digest: str
    files: list[tuple[str, bytes]] = field(default_factory=list)  # (relative name, bytes)


def job_paths(job: Job) -> list[tuple[str, str, Path]]:
    """(what, path) of every model, config and adapter of the job given as a local path."""
    named = [("model", job.model), ("model_config", job.model_config)]
    for i, c in enumerate(job.controlnets):
        named += [(f"controlnets[{i}].model", c.model), (f"controlnets[{i}].config", c.config)]
    named += [(f"loras[{i}].path", a.path) for i, a in enumerate(job.loras)]
    named += [(f"embeddings[{i}].path", a.path) for i, a in enumerate(job.embeddings)]
    local = [(what, name, _local_path(name)) for what, name in named]
    return [(what, name, path) for what, name, path in local if path is not None]


def check_sendable(job: Job) -> dict[str, tuple[Path, list[tuple[str, Path]]]]:
    """Each local path the job names with its files; ClusterError for one too big to send."""
    found: dict[str, tuple[Path, list[tuple[str, Path]]]] = {}
    for what, name, path in job_paths(job):
        files = _files_of(path)
        size = sum(p.stat().st_size for _, p in files)
        if size > MAX_SENT_MODEL_BYTES:
            raise ClusterError(
                f"{what}: {name} is a local path of {size / 2**30:.1f} GiB; the cluster's "
                f"workers are sent local models up to {MAX_SENT_MODEL_BYTES / 2**30:.0f} GiB. "
                "Give its hub id instead (each worker loads hub ids from its own cache), or "
                "run locally"
            )
        found[name] = (path, files)
    return found


def pack_paths(found: dict[str, tuple[Path, list[tuple[str, Path]]]]) -> dict[str, PackedPath]:
    """Every file's bytes, read once: the job's path -> PackedPath."""
    packed = {}
    for name, (path, files) in found.items():
        packed[name] = PackedPath(
            path.name,
            path.is_file(),
            _digest(files),
            [(rel, p.read_bytes()) for rel, p in files],
        )
    return packed


def unpack_path(packed: PackedPath, root: Path) -> str:
    """Write a PackedPath under ``root/digest`` (once per content); its local path."""
    folder = root / packed.digest
    if not (folder / ".complete").is_file():
        partial = root / f".{packed.digest}.{uuid.uuid4().hex[:8]}"
        for rel, data in packed.files:
            target = (partial / packed.name / rel).resolve()
            if partial.resolve() not in target.parents:  # no ../ out of the folder
                raise ClusterError(f"refusing file name {rel!r} of {packed.name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (partial / ".complete").write_text("ok")
        try:
            partial.rename(folder)
        except OSError:  # another shard unpacked the same content first
            shutil.rmtree(partial, ignore_errors=True)
    return str(folder / packed.name)


def localise_job(job: dict[str, Any], paths: Mapping[str, str]) -> dict[str, Any]:
    """The job dict with every sent path replaced by where it was unpacked."""
    job = json.loads(json.dumps(job))
    for key in ("model", "model_config"):
        job[key] = paths.get(job.get(key), job.get(key))
    for c in job.get("controlnets", []):
        c["model"] = paths.get(c["model"], c["model"])
        c["config"] = paths.get(c.get("config"), c.get("config"))
    for a in job.get("loras", []) + job.get("embeddings", []):
        a["path"] = paths.get(a["path"], a["path"])
    return job


# --------------------------------------------------------------------------- the actor


def _rgb_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) uint8, as runner.TensorFrames gives the engine."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def _mask_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, H, W) float32 in [0, 1], as the runner's masks."""
    return torch.from_numpy(image.mean(axis=2, dtype=np.float32) / 255.0)[None]


def _tensors(images: Mapping[int, np.ndarray] | None, convert: Callable) -> dict | None:
    """frame -> tensor of the frames a shard was sent."""
    return None if images is None else {f: convert(image) for f, image in images.items()}


def compute_shard(
    cache: ModelCache,
    payload: dict[str, Any],
    inputs: dict[str, Any],
    files: dict[str, PackedPath],
    emit: Callable[[dict[str, Any]], None],
    should_cancel: Callable[[], bool],
    files_root: Path,
) -> None:
    """Run one shard: the engine on its frames and the anchor, then decode as the local run
    does; every finished frame goes to ``emit`` as {"frame", "rgb"[, "latent"]}."""
    allow_pickle = bool(payload["allow_pickle"])
    paths = {name: unpack_path(p, files_root) for name, p in files.items()}
    job = validate_job(localise_job(payload["job"], paths))
    width, height = payload["size"]
    frame_ids = list(payload["frames"])  # delivered
    computed = sorted(set(payload["computed"]) | set(frame_ids))  # with the filling frames
    device = resolve_device(job.device)
    dtype_choice = choose_dtype(job.dtype, device)
    hooks = DownloadHooks(should_cancel=should_cancel)  # hub ids: this worker's own cache
    base, controlnets = load_models(job, cache, hooks, device, dtype_choice.dtype, allow_pickle)
    emit(
        {
            "info": {
                "host": platform.node(),
                "device": str(device),
                "dtype": dtype_choice.name,
                "dtype_reason": dtype_choice.reason,
                "family": base.family.key,
                "family_label": base.family.label,
                "prediction_type": base.scheduler_config.get("prediction_type", "epsilon"),
                "torch": torch.__version__,
            }
        }
    )
    controls = [
        ControlInput(model, _tensors(images, _rgb_tensor), spec.weight)
        for spec, model, images in zip(
            job.controlnets, controlnets, inputs["controls"], strict=True
        )
    ]
    image = _tensors(inputs["image"], _rgb_tensor)
    masks = _tensors(inputs["masks"], _mask_tensor)
    engine = TextToVideoZero(base, controlnets)

    def on_step(step: int, total: int, fraction: float) -> None:
        emit({"progress": fraction, "step": step})

    adapters = applied_adapters(base, job.loras, job.embeddings, allow_pickle=allow_pickle)
    with adapters as pipe:
        latents = engine(
            prompt=convert_prompt(pipe, base, job.prompt),
            negative_prompt=convert_prompt(pipe, base, job.negative_prompt),
            num_frames=job.frames,
            height=height,
            width=width,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance,
            seed=job.seed,
            chunk_size=job.chunk_size,
            frame_ids=computed,
            motion=job.effective_motion,
            motion_dynamics=job.t0 is not None,
            t0=job.t0,
            t1=job.t1,
            smooth_bg=job.smooth_bg,
            smooth_alpha=job.smooth_alpha,
            masks=masks,
            controls=controls,
            image=image,
            image_guidance_scale=job.image_guidance,
            callbacks=Callbacks(progress=on_step, should_cancel=should_cancel),
        )
    row = {f: i for i, f in enumerate(computed)}
    mine = set(frame_ids)
    for group in payload["decode_groups"]:
        if should_cancel():
            raise Cancelled()
        stand_in = next(row[f] for f in group if f in row)
        rows = latents[[row.get(f, stand_in) for f in group]]  # (len(group), 4, h, w)
        for f, rgb, latent in zip(group, engine.decode(rows).numpy(), rows, strict=True):
            if f not in mine:
                continue  # another shard's frame: only here to keep the batch's shape
            item = {"frame": f, "rgb": rgb}
            if payload["save_latents"]:
                item["latent"] = latent.numpy().astype(np.float32)
            emit(item)


class ShardWorker:
    """A Ray actor holding one GPU (or CPU slot): models stay loaded between shards and jobs.

    ``run_shard`` streams a shard's events (Ray streaming generator); shards run one at a
    time (a lock), while ``cancel`` and ``describe`` answer beside them.
    """

    def __init__(self) -> None:
        self.cache = ModelCache(max_bases=1)
        self.lock = threading.Lock()
        self.cancelled: set[str] = set()
        self.files_root = Path(tempfile.mkdtemp(prefix="t2vz-cluster-files-"))
        cpus = self._assigned("CPU")
        if not self._assigned("GPU") and cpus:
            torch.set_num_threads(max(1, int(cpus)))  # a CPU actor uses its own slots only

    @staticmethod
    def _assigned(resource: str) -> float:
        """How much of ``resource`` Ray gave this actor."""
        import ray

        return float(ray.get_runtime_context().get_assigned_resources().get(resource, 0))

    def describe(self) -> dict[str, Any]:
        """Host, pid and GPUs of this actor (answered at once, even while a shard runs)."""
        import ray

        return {
            "host": platform.node(),
            "pid": os.getpid(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "cuda": torch.cuda.is_available(),
            "model_loads": self.cache.loads,  # models loaded since it started
        }

    def native_side(self, files: dict[str, PackedPath], spec: dict, allow_pickle: bool) -> int:
        """The base model's native side (for a job without a size): loads it here."""
        paths = {name: unpack_path(p, self.files_root) for name, p in files.items()}
        job = validate_job(localise_job(spec, paths))
        device = resolve_device(job.device)
        try:
            with self.lock:
                base = self.cache.base(
                    job.model,
                    pix2pix=job.mode == "pix2pix",
                    config=job.model_config,
                    allow_pickle=allow_pickle,
                    device=device,
                    dtype=choose_dtype(job.dtype, device).dtype,
                    prediction_type=job.prediction_type,
                )
        except Exception as exc:
            raise ClusterError(f"worker {platform.node()}: {type(exc).__name__}: {exc}") from None
        return native_side(base)

    def cancel(self, token: str) -> None:
        """Stop the shard ``token`` at its next model call (or before it starts)."""
        self.cancelled.add(token)

    def run_shard(
        self, token: str, payload: dict[str, Any], inputs: dict, files: dict
    ) -> Iterator[dict[str, Any]]:
        """Compute a shard, yielding {"info"}, {"progress"}, {"frame"} and a final
        {"end": "done"|"cancelled"|"error"} (errors as text naming this host).

        ``inputs`` (its frames) and ``files`` come as top-level object-store arguments, which
        Ray hands over as values (refs nested in a payload stalled live actors here)."""
        events: queue.Queue[dict[str, Any] | None] = queue.Queue()

        def work() -> None:
            try:
                with self.lock:
                    if token in self.cancelled:
                        raise Cancelled()
                    started = time.perf_counter()
                    compute_shard(
                        self.cache,
                        payload,
                        inputs,
                        files,
                        events.put,
                        lambda: token in self.cancelled,
                        self.files_root,
                    )
                    seconds = time.perf_counter() - started
                events.put({"end": "done", "compute_s": seconds})
            except Cancelled:
                events.put({"end": "cancelled"})
            except Exception as exc:
                log.exception("shard failed")
                events.put(
                    {
                        "end": "error",
                        "host": platform.node(),
                        "kind": type(exc).__name__,
                        "message": str(exc),
                    }
                )
            finally:
                self.cancelled.discard(token)
                events.put(None)

        threading.Thread(target=work, daemon=True, name=f"shard-{token}").start()
        while (event := events.get()) is not None:
            yield event


# --------------------------------------------------------------------------- the pool


def code_fingerprint() -> str:
    """A hash of the backend's code: actors of other code versions are never shared."""
    files = [(n, p) for n, p in _files_of(BACKEND_DIR) if p.suffix in (".py", ".json", ".txt")]
    return _digest(files)[:12]


_actor_class: Any = None
# A handle of each worker actor this process made or found, by name, kept for as long as
# it is connected: Ray ends an actor its maker holds no handle to any more, and with it
# the loaded models (measured: every job loaded its models again without this). Each job
# still calls through handles of its own (get_if_exists).
_handles: dict[str, Any] = {}


@dataclass
class Actor:
    """One worker actor as this job sees it."""

    name: str
    handle: Any
    host: str = "?"


def worker_actors(ray: Any) -> list[Actor]:
    """The cluster's shared worker actors, one per GPU (per CPU on a CPU-only cluster),
    created on first use by whichever client comes first, found by name by the others.

    Not detached: they end with the client that made them (another client's shards then
    retry on fresh ones), so an idle cluster holds no GPU for nobody.
    """
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    count = gpus or max(1, int(resources.get("CPU", 1)))
    fingerprint = code_fingerprint()
    kind = "gpu" if gpus else "cpu"
    global _actor_class
    if _actor_class is None:
        _actor_class = ray.remote(ShardWorker)
    cls = _actor_class
    actors = []
    for i in range(count):
        name = f"t2vz-{fingerprint}-{kind}{i}"
        handle = cls.options(
            name=name,
            namespace=NAMESPACE,
            get_if_exists=True,
            num_gpus=1 if gpus else 0,
            num_cpus=0 if gpus else 1,
            max_concurrency=ACTOR_CONCURRENCY,
            max_restarts=1,  # a killed actor comes back for later shards
            max_task_retries=0,  # a lost shard is resubmitted by run_on_cluster instead
        ).remote()
        _handles.setdefault(name, handle)  # the first handle keeps the actor alive
        actors.append(Actor(name, handle))
    return actors


# --------------------------------------------------------------------------- submitting


def _lost_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """Ray's exceptions for an actor or node that went away mid-call."""
    exc = ray.exceptions
    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError")
    return tuple(getattr(exc, n) for n in names if hasattr(exc, n)) + (exc.ObjectLostError,)


@dataclass
class _Progress:
    """Frames and denoising fractions of every shard of one job."""

    total_frames: int
    steps: int
    fractions: dict[Shard, float] = field(default_factory=dict)
    written: set[int] = field(default_factory=set)
    step: int = 0

    def denoised(self) -> float:
        """Fraction of the job's denoising done, frames weighted."""
        done = sum(f * len(s.frames) for s, f in self.fractions.items())
        return done / self.total_frames


class _Submission:
    """One job's shards on the cluster: dispatch, stream back, resubmit, cancel."""

    def __init__(
        self, ray: Any, actors: list[Actor], shards: list[Shard], payload: Callable, files: Any
    ):
        self.ray = ray
        self.files = files  # ObjectRef of the job's PackedPaths, shared by its shards
        self.alive = list(actors)
        self.pending = collections.deque(shards)
        self.payload = payload
        self.busy: dict[str, tuple[Shard, str]] = {}  # actor name -> (shard, token)
        self.attempts: collections.Counter[Shard] = collections.Counter()
        self.events: queue.Queue[tuple[str, Shard, Actor, Any]] = queue.Queue()
        self.lost = _lost_errors(ray)
        self.infos: list[dict[str, Any]] = []
        self.started: dict[str, float] = {}  # actor name -> when its shard was dispatched
        # Per finished shard: frames, wall seconds from dispatch to its last event, and the
        # seconds the actor spent computing it (the difference: dispatch and transfer).
        self.timings: list[dict[str, Any]] = []

    def _stream(self, actor: Actor, shard: Shard, token: str, payload: dict, inputs: Any) -> None:
        """Thread: forward a shard's events into the queue."""
        try:
            refs = actor.handle.run_shard.options(num_returns="streaming").remote(
                token, payload, inputs, self.files
            )
            for ref in refs:
                self.events.put(("event", shard, actor, self.ray.get(ref)))
        except self.lost as exc:
            self.events.put(("lost", shard, actor, exc))
        except Exception as exc:
            self.events.put(("failed", shard, actor, exc))

    def dispatch(self) -> None:
        """Give each idle live actor the next pending shard."""
        for actor in self.alive:
            if not self.pending:
                return
            if actor.name in self.busy:
                continue
            shard = self.pending.popleft()
            token = uuid.uuid4().hex
            self.busy[actor.name] = (shard, token)
            self.started[actor.name] = time.perf_counter()
            self.attempts[shard] += 1
            # Built here, on the job's thread: the input stores are files read by seeking,
            # which two threads must not do at once (measured: mixed-up source frames).
            payload, inputs = self.payload(shard)
            threading.Thread(
                target=self._stream,
                args=(actor, shard, token, payload, inputs),
                daemon=True,
                name="t2vz-shard",
            ).start()

    def cancel_all(self) -> None:
        """Ask every actor with a running shard of this job to stop it."""
        for actor in self.alive:
            if actor.name in self.busy:
                with contextlib.suppress(Exception):
                    actor.handle.cancel.remote(self.busy[actor.name][1])

    def lose(self, actor: Actor, shard: Shard, exc: BaseException) -> None:
        """An actor died mid-shard: drop it for this job and resubmit the shard."""
        self.busy.pop(actor.name, None)
        self.alive = [a for a in self.alive if a.name != actor.name]
        _handles.pop(actor.name, None)  # next time by name: restarted by Ray, or a new one
        if self.attempts[shard] >= SHARD_ATTEMPTS:
            raise ClusterError(
                f"shard {shard.label} lost its worker {SHARD_ATTEMPTS} times; last: {exc}"
            )
        log.warning(
            "note: the worker on %s running %s went away (%s); the shard runs again on "
            "another worker (its frames are the same)",
            actor.host,
            shard.label,
            type(exc).__name__,
        )
        self.pending.appendleft(shard)
        if not self.alive:  # all gone: the named actors again (Ray restarts or recreates)
            self.alive = worker_actors(self.ray)

    def wait_stopped(self, timeout: float) -> None:
        """After cancel_all: wait (at most ``timeout``) until the shards have ended."""
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            try:
                kind, shard, actor, event = self.events.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind != "event" or "end" in event:
                self.busy.pop(actor.name, None)


def _pick(store: FrameStore | None, frames: Sequence[int]) -> dict | None:
    """frame -> (H, W, 3) uint8 image of the frames a shard needs."""
    return None if store is None else {f: store[f] for f in frames}


def run_on_cluster(
    job: Job,
    config: ClusterConfig,
    events: JobEvents | None = None,
    *,
    allow_pickle: bool = False,
) -> JobResult:
    """``runner.run_job`` with the frames computed on a Ray cluster; the same result folder.

    Raises what run_job raises for bad jobs and inputs (before anything is dispatched),
    ClusterError for an unreachable or refusing cluster, a worker's failure (naming its
    host) or a shard lost too often, and Cancelled within a few seconds of a cancel.
    """
    started = time.perf_counter()
    events = events or JobEvents()
    out = Path(job.out).expanduser().resolve()
    if out.exists():
        raise OutputExistsError(f"out: {out} already exists; results never overwrite a folder")
    check_config(config)
    if getattr(job, "consistency", None) == "flow":
        raise ClusterError(
            'consistency "flow" ties each frame to the one before it, so the job cannot be '
            "split into shards: run it locally (without --cluster)"
        )
    if job.model.startswith(BUILTIN_PREFIX) and job.model[len(BUILTIN_PREFIX) :] in ALL_TINY_KINDS:
        log.warning("%s is a tiny random-weight smoke-test model: expect noise", job.model)
    check_output_writable(out)
    frame_ids = job.frame_indices
    needed = sorted(set(frame_ids) | {0})
    sized = job.width is not None and job.height is not None
    aspect = 1.0 if sized else input_aspect(job)
    found = check_sendable(job)
    check_families(job)  # a ControlNet of another family: refused here, as locally
    stores: list[FrameStore] = []

    detectors = DetectorRun()  # openpose / depth detectors run here, on the inputs' machine

    def read_inputs(w: int, h: int) -> tuple[list[FrameStore], Any, Any]:
        controls = [
            store_control_frames(spec, needed, w, h, job.fit, detectors, allow_pickle)
            for spec in job.controlnets
        ]
        image = store_frames(job.video, needed, w, h, job.fit) if job.video else None
        masks = store_frames(job.masks, needed, w, h, job.fit) if job.masks else None
        stores.extend(s for s in [*controls, image, masks] if s is not None)
        return controls, image, masks

    try:
        if sized:  # inputs first: a short video must not wait for the cluster
            w, h = job.width, job.height
            control_frames, image, masks = read_inputs(w, h)
        ray = connect(config)
        actors = worker_actors(ray)
        files = ray.put(pack_paths(found))  # once a job, fetched once a node
        spec = job.to_dict()
        if not sized:
            try:
                side = ray.get(actors[0].handle.native_side.remote(files, spec, allow_pickle))
            except ray.exceptions.RayTaskError as exc:
                raise ClusterError(str(exc.cause) if exc.cause else str(exc)) from None
            w, h = job_size(job, side, aspect)
            control_frames, image, masks = read_inputs(w, h)
        shard_size = config.shard_size or default_shard_size(len(frame_ids), len(actors))
        encode_batch = PIX2PIX_ENCODE_BATCH if job.mode == "pix2pix" else 1
        shards = plan_shards(frame_ids, shard_size, job.chunk_size, encode_batch)
        log.info("%d frames in %d shards on %d workers", len(frame_ids), len(shards), len(actors))

        def payload(shard: Shard) -> tuple[dict[str, Any], Any]:
            want = sorted(set(shard.frames) | set(shard.computed) | {0})
            inputs = {
                "controls": [_pick(s, want) for s in control_frames],
                "image": _pick(image, want),
                "masks": _pick(masks, want),
            }
            return {
                "job": spec,
                "size": (w, h),
                "frames": list(shard.frames),
                "computed": list(shard.computed or shard.frames),
                "decode_groups": decode_groups(shard, frame_ids),
                "save_latents": job.save_latents,
                "allow_pickle": allow_pickle,
            }, ray.put(inputs)

        submission = _Submission(ray, actors, shards, payload, files)
        with staged_output(out) as staging:
            latents = _collect(submission, job, frame_ids, staging, events)
            info = submission.infos[0] if submission.infos else {}
            _finish(staging, job, out, (w, h), frame_ids, latents, allow_pickle, info)
            seconds = time.perf_counter() - started
            run_info = {
                "backend": __version__,
                "device": info.get("device", "?"),
                "dtype": info.get("dtype", "?"),
                "dtype_reason": info.get("dtype_reason", ""),
                "family": info.get("family", "?"),
                "family_label": info.get("family_label", "?"),
                "torch": info.get("torch", "?"),
                "python": platform.python_version(),
                "seconds": round(seconds, 3),
                "cluster": {
                    "address": config.address,
                    "shards": len(shards),
                    "workers": sorted({i.get("host", "?") for i in submission.infos}),
                    "shard_timings": submission.timings,
                },
            }
            write_file(
                staging / "run.json", json.dumps(run_info, indent=2, sort_keys=True).encode()
            )
    finally:
        for store in stores:
            store.close()
    written = [frame_name(f) for f in frame_ids]
    return JobResult(str(out), [str(out / n) for n in written], seconds, run_info)


def _collect(
    sub: _Submission, job: Job, frame_ids: list[int], staging: Path, events: JobEvents
) -> dict[int, np.ndarray]:
    """Dispatch the shards and write every frame that comes back; the latents by frame."""
    progress = _Progress(len(frame_ids), job.steps)
    latents: dict[int, np.ndarray] = {}
    try:
        while sub.pending or sub.busy:
            if events.should_cancel is not None and events.should_cancel():
                raise Cancelled()
            sub.dispatch()
            try:
                kind, shard, actor, event = sub.events.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind == "lost":
                sub.lose(actor, shard, event)
                continue
            if kind == "failed":
                raise ClusterError(f"shard {shard.label} on {actor.host}: {event}") from event
            if "info" in event:
                actor.host = event["info"]["host"]
                sub.infos.append(event["info"])
            elif "progress" in event:
                fraction = max(progress.fractions.get(shard, 0.0), float(event["progress"]))
                progress.fractions[shard] = fraction
                progress.step = max(progress.step, round(progress.denoised() * job.steps))
                _report(events, progress, job.steps, "denoising")
            elif "frame" in event:
                _write_frame(event, staging, progress, latents, events)
                progress.fractions[shard] = 1.0
                _report(events, progress, job.steps, "decoding")
            elif event.get("end") == "error":
                raise ClusterError(
                    f"worker {event['host']} ({shard.label}): {event['kind']}: {event['message']}"
                )
            elif "end" in event:
                sub.busy.pop(actor.name, None)
                sub.timings.append(
                    {
                        "frames": len(shard.frames),
                        "computed": len(set(shard.computed) | set(shard.frames) | {0}),
                        "seconds": round(time.perf_counter() - sub.started[actor.name], 4),
                        "compute_seconds": round(float(event.get("compute_s", 0.0)), 4),
                    }
                )
    except BaseException:
        sub.cancel_all()
        sub.wait_stopped(CANCEL_WAIT_S)
        raise
    missing = sorted(set(frame_ids) - progress.written)
    if missing:  # a shard that ended without all its frames: never a result with gaps
        raise ClusterError(
            f"the cluster returned no frame for frames {[f + 1 for f in missing[:5]]}"
        )
    return latents


def _report(events: JobEvents, progress: _Progress, steps: int, stage: str) -> None:
    """A progress event counting the frames of all shards."""
    if events.progress is None:
        return
    done = len(progress.written)
    fraction = 0.9 * progress.denoised() + 0.1 * done / progress.total_frames
    events.progress(progress.step, steps, done, progress.total_frames, fraction, stage)


def _write_frame(
    event: dict, staging: Path, progress: _Progress, latents: dict, events: JobEvents
) -> None:
    """Write one returned frame as the local run names it (a resubmitted shard rewrites
    the same bytes)."""
    f = int(event["frame"])
    path = staging / frame_name(f)
    write_png(path, np.asarray(event["rgb"], dtype=np.uint8))
    if "latent" in event:
        latents[f] = np.asarray(event["latent"], dtype=np.float32)
    if f not in progress.written:
        progress.written.add(f)
        if events.preview is not None:
            events.preview(f, str(path))


def _finish(
    staging: Path,
    job: Job,
    out: Path,
    size: tuple[int, int],
    frame_ids: list[int],
    latents: dict[int, np.ndarray],
    allow_pickle: bool,
    info: dict[str, Any],
) -> None:
    """The mp4, latents.npy and job.json of the staged result, as run_job writes them."""
    if job.write_mp4:  # frames in order, read back from the PNGs just written (lossless)
        movie = Mp4Writer(staging / "video.mp4", job.fps)
        try:
            for f in frame_ids:
                movie.write(_read_image(staging / frame_name(f)))
        except BaseException:
            movie.abort()
            raise
        movie.close()
    if job.save_latents:
        latents_file = staging / "latents.npy"
        with writing(latents_file):
            np.save(latents_file, np.stack([latents[f] for f in frame_ids]).astype(np.float32))
    resolved = job.to_dict()
    resolved["motion"] = list(job.effective_motion) if job.mode != "pix2pix" else None
    resolved["out"] = str(out)
    resolved["width"], resolved["height"] = size
    resolved["allow_pickle"] = allow_pickle
    resolved["family"] = info.get("family")  # what the workers read the model as
    resolved["prediction_type"] = info.get("prediction_type", job.prediction_type)
    for entry, spec in zip(resolved["controlnets"], job.controlnets, strict=True):
        weights = weights_used(spec.detector, spec.detector_models)
        if weights is not None:
            entry["detector_models"] = weights
    write_file(staging / "job.json", json.dumps(resolved, indent=2, sort_keys=True).encode())
