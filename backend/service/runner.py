"""Runs a validated job end to end: load models and inputs, generate, write the result.

Shared by the CLI and the worker. Events go out through plain callables so the caller
decides whether they become log lines or protocol messages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..engine.compile import CompileOptions, CompileReport, CompileWatch, finish_report
from ..engine.flow import FlowFusion, FrameFusion
from ..engine.pipeline import Callbacks, Cancelled, ControlInput, TextToVideoZero, is_union
from ..media.controls import store_control_frames
from ..media.detectors import DetectionCancelled, DetectorRun, weights_used
from ..media.flow import EstimatedFlows, FileFlows
from ..media.video_io import (
    FrameStore,
    Mp4Writer,
    OutputExistsError,
    check_output_writable,
    frame_name,
    frame_size,
    staged_output,
    store_frames,
    write_file,
    write_png,
    writing,
)
from ..models.adapters import applied_adapters, convert_prompt
from ..models.families import FamilyError, check_same_family
from ..models.hub import DownloadCancelled, DownloadHooks, DownloadProgress
from ..models.loading import (
    BaseModel,
    DtypeChoice,
    ModelCache,
    ModelLoadError,
    choose_dtype,
    peek_family,
    resolve_device,
)
from ..models.tiny import ALL_TINY_KINDS, BUILTIN_PREFIX, cache_dir
from ..protocol import FLOW_ESTIMATE, UNION_CONTROL_TYPES, ControlNetSpec, Job, resolve_size

log = logging.getLogger(__name__)

# Frames decoded per VAE call: bounds decoder memory whatever the video length.
DECODE_SLICE = 4


@dataclass
class JobEvents:
    """Where a running job reports; every hook is optional."""

    # (step, total steps, frames written, frames total, fraction of all work, stage)
    progress: Callable[[int, int, int, int, float, str], None] | None = None
    # (0-based frame index, path of the written frame; valid until the job ends)
    preview: Callable[[int, str], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    # While denoising, also preview frame 1 as it forms, at most every this many seconds
    # (and never spending more than 1/20 of the time on it); None: finished frames only.
    preview_every: float | None = None
    # Model downloads before the job starts: which model and file, bytes, rate.
    download: Callable[[DownloadProgress], None] | None = None


class DenoisingPreview:
    """Decodes frame 1's predicted clean latent now and then while the job denoises.

    Files are ``.preview-STEP.png`` in the staging folder; the last two are kept (the
    add-on may still be loading the older one) and all are removed before the result lands.
    """

    def __init__(self, engine: TextToVideoZero, folder: Path, events: JobEvents):
        self.engine = engine
        self.folder = folder
        self.events = events
        self.due = time.perf_counter() + (events.preview_every or 0.0)
        self.files: list[Path] = []

    def __call__(self, step: int, latent: torch.Tensor) -> None:
        """Engine callback: decode and announce a preview when one is due."""
        if self.events.preview is None or time.perf_counter() < self.due:
            return
        started = time.perf_counter()
        path = self.folder / f".preview-{step:04d}.png"
        write_png(path, self.engine.decode(latent)[0].numpy())
        self.files.append(path)
        while len(self.files) > 2:
            self.files.pop(0).unlink(missing_ok=True)
        self.events.preview(0, str(path))
        spent = time.perf_counter() - started
        self.due = time.perf_counter() + max(self.events.preview_every or 0.0, 20 * spent)

    def remove_files(self) -> None:
        """Delete the preview files (before the folder becomes the result)."""
        for path in self.files:
            path.unlink(missing_ok=True)
        self.files.clear()


@dataclass
class JobResult:
    """A finished job: its folder and frames (absolute paths, in frame order)."""

    out: str
    frames: list[str]
    seconds: float
    extras: dict = field(default_factory=dict)


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) uint8: the engine scales it per chunk."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def _mask_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, H, W) float32 foreground mask in [0, 1]; white is foreground."""
    return torch.from_numpy(image.mean(axis=2, dtype=np.float32) / 255.0)[None]


class TensorFrames(Mapping[int, torch.Tensor]):
    """A FrameStore seen as the engine's per-frame tensors, read when the engine indexes a
    frame (one chunk at a time), never all at once."""

    def __init__(
        self, store: FrameStore, convert: Callable[[np.ndarray], torch.Tensor] = _to_tensor
    ):
        self.store = store
        self.convert = convert

    def __getitem__(self, frame: int) -> torch.Tensor:
        return self.convert(self.store[frame])

    def __contains__(self, frame: object) -> bool:
        return frame in self.store  # without reading the frame

    def __iter__(self) -> Iterator[int]:
        return iter(self.store)

    def __len__(self) -> int:
        return len(self.store)


def native_side(base: Any) -> int:
    """The side of the square of the base model's training pixel count: sample_size x VAE
    factor (a (height, width) sample size gives the side of the same area)."""
    sample = base.unet.config.sample_size
    if isinstance(sample, (list, tuple)):
        sample = round(math.sqrt(int(sample[0]) * int(sample[-1])))
    return int(sample) * base.vae_scale_factor


def input_aspect(job: Job) -> float:
    """Width / height of the job's input video (pix2pix source, first control video), or 1.

    OpenPose keypoint files have no pixel size: square, unless the job gives a size.
    """
    spec = job.video
    if spec is None and job.controlnets:
        spec = job.controlnets[0].control
    if spec is None or spec.path.lower().endswith(".json"):
        return 1.0
    width, height = frame_size(spec)
    return width / height


def job_size(job: Job, side: int, aspect: float) -> tuple[int, int]:
    """(width, height) the job runs at: as given, or ``aspect`` at ``side``**2 pixels."""
    if job.width is not None and job.height is not None:
        return job.width, job.height
    width, height = resolve_size(job.width, job.height, aspect, side)
    log.info("size %dx%d (%s fit of the input; native side %d)", width, height, job.fit, side)
    return width, height


class NonFiniteError(RuntimeError):
    """The denoised latents hold NaN or infinite values: the frames would be black."""


def check_finite_latents(latents: torch.Tensor) -> None:
    """NonFiniteError when the final latents are not all finite (nothing is written then)."""
    bad = int((~torch.isfinite(latents)).sum())
    if bad:
        raise NonFiniteError(
            f"the final latents hold {bad} NaN or infinite values of {latents.numel()}: the "
            "frames would be black, so none were written (a LoRA or embedding with huge "
            "weights, or float16 overflow: try --dtype float32)"
        )


def engine_arguments(
    job: Job, size: tuple[int, int], frame_ids: list[int], motion: tuple[float, float]
) -> dict[str, Any]:
    """The engine's settings for ``job`` at ``size`` (width, height): everything but the
    prompts, the inputs and the callbacks."""
    width, height = size
    return {
        "num_frames": job.frames,
        "height": height,
        "width": width,
        "num_inference_steps": job.steps,
        "guidance_scale": job.guidance,
        "seed": job.seed,
        "chunk_size": job.chunk_size,
        "frame_ids": frame_ids,
        "motion": motion,
        "motion_dynamics": job.t0 is not None,
        "t0": job.t0,
        "t1": job.t1,
        "smooth_bg": job.smooth_bg,
        "smooth_alpha": job.smooth_alpha,
        "image_guidance_scale": job.image_guidance,
        "consistency": job.consistency,
    }


def output_folder(job: Job) -> Path:
    """The job's result folder, resolved; OutputExistsError when it exists or is a link,
    an error naming it when it cannot be written (checked before any model loads)."""
    given = Path(job.out).expanduser()
    if given.is_symlink():  # resolve() would follow it, a dangling one too, to its target
        raise OutputExistsError(
            f"out: {given} is a symbolic link; results are never written through one"
        )
    out = given.resolve()
    if out.exists():
        raise OutputExistsError(f"out: {out} already exists; results never overwrite a folder")
    check_output_writable(out)
    return out


def resolved_job(
    job: Job,
    out: Path,
    size: tuple[int, int],
    motion: tuple[float, float],
    allow_pickle: bool,
    base: BaseModel,
) -> dict[str, Any]:
    """What job.json holds: the job as it ran (its size, motion, family, what it allowed,
    the detector weights it used), so it regenerates the same result."""
    resolved = job.to_dict()
    resolved["motion"] = list(motion) if job.mode != "pix2pix" else None
    resolved["out"] = str(out)
    resolved["width"], resolved["height"] = size  # the size it ran at, however chosen
    resolved["allow_pickle"] = allow_pickle  # what this run allowed, not what was asked
    resolved["family"] = base.family.key  # what the model was read as (job.family)
    # What the UNet was run as predicting: the job's, a single file's metadata's or the
    # configs' (an SD 2.x single file then reloads with the same configs repo).
    resolved["prediction_type"] = base.scheduler_config.get("prediction_type", "epsilon")
    for entry, spec in zip(resolved["controlnets"], job.controlnets, strict=True):
        weights = weights_used(spec.detector, spec.detector_models)
        if weights is not None:  # the detector weights it ran with, defaults included
            entry["detector_models"] = weights
    return resolved


def run_record(
    device: torch.device, dtype_choice: DtypeChoice, base: BaseModel, seconds: float
) -> dict[str, Any]:
    """What run.json holds: where and how the job ran (not needed to regenerate it)."""
    return {
        "backend": __version__,
        "device": str(device),
        "dtype": dtype_choice.name,
        "dtype_reason": dtype_choice.reason,
        "family": base.family.key,
        "family_label": base.family.label,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "seconds": round(seconds, 3),
    }


def check_families(job: Job) -> None:
    """Refuse a ControlNet of another family than the base model before either loads, naming
    both (read from local configs or tensor names; a hub id not downloaded yet is checked
    once loaded, still before any denoising)."""
    base = peek_family(job.model)
    if base is None:
        return
    for spec in job.controlnets:
        family = peek_family(spec.model)
        if family is not None:
            try:
                check_same_family(base, family, job.model, spec.model)
            except FamilyError as exc:
                raise ModelLoadError(str(exc)) from None


def union_control_type(spec: ControlNetSpec, model: Any) -> int | None:
    """The control type index a union ControlNet reads this video as (the spec's
    control_type, else its detector's kind), None for a plain ControlNet; ModelLoadError
    naming the ControlNet when it cannot be told or does not fit."""
    if not is_union(model):
        if spec.control_type is not None:
            raise ModelLoadError(
                f"controlnet {spec.model!r} is not a union ControlNet: control_type "
                f"{spec.control_type!r} applies only to union models (ControlNetUnionModel)"
            )
        return None
    name = spec.control_type or (spec.detector if spec.detector in UNION_CONTROL_TYPES else None)
    if name is None:
        raise ModelLoadError(
            f"controlnet {spec.model!r} is a union ControlNet: give its control_type, one of "
            f"{', '.join(UNION_CONTROL_TYPES)} (detector {spec.detector!r} does not say which)"
        )
    index = UNION_CONTROL_TYPES[name]
    kinds = int(model.config.num_control_type)
    if index >= kinds:
        raise ModelLoadError(
            f"controlnet {spec.model!r} knows {kinds} control types; {name!r} is number {index}"
        )
    return index


def load_models(
    job: Job,
    cache: ModelCache,
    download: DownloadHooks,
    device: torch.device,
    dtype: torch.dtype,
    allow_pickle: bool,
) -> tuple[BaseModel, list[Any]]:
    """The job's base model and ControlNets (cached): families checked first, a cancelled
    download raising Cancelled, a model of another family than the job records refused."""
    check_families(job)
    try:
        base = cache.base(
            job.model,
            download=download,
            pix2pix=job.mode == "pix2pix",
            config=job.model_config,
            allow_pickle=allow_pickle,
            device=device,
            dtype=dtype,
            prediction_type=job.prediction_type,
        )
        if job.family is not None and job.family != base.family.key:
            raise ModelLoadError(
                f"the job was made for an {job.family} model, but {job.model!r} is "
                f"{base.family.label} ({base.family.key}): pick a model of that family or "
                "remove the job's family field"
            )
        controlnets = [
            cache.controlnet(
                c.model,
                config=c.config,
                download=download,
                allow_pickle=allow_pickle,
                device=device,
                dtype=dtype,
            )
            for c in job.controlnets
        ]
    except DownloadCancelled as exc:
        raise Cancelled() from exc
    return base, controlnets


def write_frames(
    engine: TextToVideoZero,
    latents: torch.Tensor,
    frame_ids: list[int],
    staging: Path,
    job: Job,
    events: JobEvents,
    fusion: FrameFusion | None = None,
    keep: list[int] | None = None,
) -> list[str]:
    """Decode the latents a few frames at a time into PNGs (and the mp4, streamed), with
    previews and progress; the names written, in frame order. ``fusion`` (flow consistency)
    fuses the decoded frames in pixel space, frame 1 on; ``keep``: the frames written
    (default all)."""
    kept = set(frame_ids if keep is None else keep)
    total_frames = len(kept)
    written: list[str] = []
    movie = Mp4Writer(staging / "video.mp4", job.fps) if job.write_mp4 else None
    try:
        for start in range(0, len(frame_ids), DECODE_SLICE):
            if events.should_cancel is not None and events.should_cancel():
                raise Cancelled()
            ids = frame_ids[start : start + DECODE_SLICE]
            images = engine.decode(latents[start : start + DECODE_SLICE])
            images = (images if fusion is None else fusion(ids, images)).numpy()
            for f, rgb in zip(ids, images, strict=True):
                if f not in kept:
                    continue
                path = staging / frame_name(f)
                write_png(path, rgb)
                if movie is not None:
                    movie.write(rgb)
                written.append(frame_name(f))
                if events.preview is not None:
                    events.preview(f, str(path))
            if events.progress is not None:
                done = len(written)
                fraction = 0.9 + 0.1 * done / total_frames
                events.progress(job.steps, job.steps, done, total_frames, fraction, "decoding")
    except BaseException:
        if movie is not None:
            movie.abort()
        raise
    if movie is not None:
        movie.close()
    return written


def flow_video(job: Job, image: Any, w: int, h: int, needed: list[int]) -> Any:
    """Frames (index -> (H, W, 3) uint8) the motion is estimated from: the pix2pix source,
    else the first control video that is a video (before its detector)."""
    if image is not None:
        return image.store
    spec = next(c.control for c in job.controlnets if not c.control.path.lower().endswith(".json"))
    return store_frames(spec, needed, w, h, job.fit)


def job_flows(
    job: Job, image: Any, w: int, h: int, factor: int, needed: list[int]
) -> Mapping[int, torch.Tensor] | None:
    """The engine's per-frame flow and visibility for consistency "flow", or None."""
    if job.consistency != "flow":
        return None
    size = (h // factor, w // factor)
    if job.flow_source in (None, FLOW_ESTIMATE):
        return EstimatedFlows(flow_video(job, image, w, h, needed), needed, size)
    return FileFlows(job.flow_source, needed, size, (h, w))


def frame_fusion(flows: Mapping[int, torch.Tensor] | None) -> FrameFusion | None:
    """The final pixel-space fusion of flow consistency (engine/flow.py), or None."""
    strength = FlowFusion().pixel_strength
    if flows is None or strength == 0:
        return None
    return FrameFusion(flows.pixels, strength)  # EstimatedFlows or FileFlows


def job_compile_options(job: Job) -> CompileOptions | None:
    """How the job compiles its UNet and ControlNets (None: it does not), cache on disk."""
    if not job.compile:
        return None
    return CompileOptions(cache_dir=cache_dir() / "compile")


def run_job(
    job: Job,
    cache: ModelCache | None = None,
    events: JobEvents | None = None,
    *,
    allow_pickle: bool = False,
) -> JobResult:
    """Generate ``job`` into ``job.out``; raise Cancelled, OutputExistsError, ModelLoadError...

    ``allow_pickle`` is the caller's own switch (``--allow-pickle``, the add-on preference):
    the job's ``allow_pickle`` field never enables pickled weights, so a job file someone
    else wrote cannot make this process unpickle (run) code.
    """
    started = time.perf_counter()
    if job.allow_pickle and not allow_pickle:
        log.warning(
            "the job asks for allow_pickle; ignored: only --allow-pickle (or the add-on "
            "preference) lets pickled weights load"
        )
    events = events or JobEvents()
    cache = cache or ModelCache()
    if job.model.startswith(BUILTIN_PREFIX) and job.model[len(BUILTIN_PREFIX) :] in ALL_TINY_KINDS:
        log.warning("%s is a tiny random-weight smoke-test model: expect noise", job.model)
    # Everything that can be checked without models is checked first: an unwritable output
    # folder or a missing input must not wait for minutes of model loading to be reported.
    out = output_folder(job)
    frame_ids = job.frame_indices
    needed = sorted(set(frame_ids) | {0})
    if job.consistency == "flow":  # frame k depends on k - 1: every frame up to the last
        needed = list(range(max(frame_ids) + 1))
    sized = job.width is not None and job.height is not None
    # Without a size, the input's aspect (opening it: a missing one fails here, before models).
    aspect = 1.0 if sized else input_aspect(job)
    fit = job.fit

    def read_inputs(w: int, h: int) -> tuple[list[FrameStore], Any, Any]:
        # Input frames are spooled to temporary files and read back per chunk while
        # denoising: memory stays flat in video length (the files vanish with the job).
        try:
            controls = [
                store_control_frames(spec, needed, w, h, fit, detectors, allow_pickle)
                for spec in job.controlnets
            ]
        except (DownloadCancelled, DetectionCancelled) as exc:  # downloading or detecting
            raise Cancelled() from exc
        image = masks = None
        if job.video is not None:
            image = TensorFrames(store_frames(job.video, needed, w, h, fit))
        if job.masks is not None:
            masks = TensorFrames(store_frames(job.masks, needed, w, h, fit), _mask_tensor)
        return controls, image, masks

    device = resolve_device(job.device)
    download = DownloadHooks(progress=events.download, should_cancel=events.should_cancel)

    def detecting(done: int) -> None:
        if events.progress is not None:  # before denoising: no fraction of the work yet
            events.progress(done, len(needed), 0, len(frame_ids), 0.0, "detecting")

    # openpose / depth detectors: models from the worker's cache, a warning once per job.
    detectors = DetectorRun(
        load=lambda name, models: cache.detector(name, models, device, download),
        should_cancel=events.should_cancel,
        progress=detecting,
    )
    if sized:  # inputs first: a short video must not wait for the model to load
        w, h = job.width, job.height
        control_frames, image, masks = read_inputs(w, h)

    dtype_choice = choose_dtype(job.dtype, device)  # bf16 on CPUs with native bf16 for "auto"
    dtype = dtype_choice.dtype
    base, controlnets = load_models(job, cache, download, device, dtype, allow_pickle)
    if not sized:  # the model's native size at the input's aspect
        w, h = job_size(job, native_side(base), aspect)
        control_frames, image, masks = read_inputs(w, h)
    controls = [
        ControlInput(model, TensorFrames(frames), spec.weight, union_control_type(spec, model))
        for spec, model, frames in zip(job.controlnets, controlnets, control_frames, strict=True)
    ]

    total_frames = len(frame_ids)

    def on_step(step: int, total: int, fraction: float) -> None:
        if events.progress is not None:
            # Denoising is ~90% of the work; decoding and writing the rest.
            events.progress(step, total, 0, total_frames, 0.9 * fraction, "denoising")

    compiling = job_compile_options(job)
    engine = TextToVideoZero(base, controlnets, compile_options=compiling)
    compile_report = CompileReport(requested=job.compile)
    motion = job.effective_motion
    flows = job_flows(job, image, w, h, base.vae_scale_factor, needed)
    # Flow consistency's final pixel-space fusion needs every decoded frame before the
    # first written one (the engine computes them anyway): made = frames 1 .. the last.
    fusion = frame_fusion(flows)
    made = needed if fusion is not None else frame_ids
    # LoRAs and embeddings live on the cached model for this job only (see adapters.py);
    # those given as hub ids download first, with the models' progress.
    adapters = applied_adapters(
        base, job.loras, job.embeddings, allow_pickle=allow_pickle, download=download
    )
    with contextlib.ExitStack() as stack:
        try:
            pipe = stack.enter_context(adapters)
        except DownloadCancelled as exc:
            raise Cancelled() from exc
        staging = stack.enter_context(staged_output(out))
        previews = None
        if events.preview_every is not None:
            previews = DenoisingPreview(engine, staging, events)
        if compiling is not None:
            stack.enter_context(CompileWatch(compile_report))
        latents = engine(
            prompt=convert_prompt(pipe, base, job.prompt),
            negative_prompt=convert_prompt(pipe, base, job.negative_prompt),
            callbacks=Callbacks(
                progress=on_step, should_cancel=events.should_cancel, anchor_preview=previews
            ),
            **engine_arguments(job, (w, h), made, motion),
            masks=masks,
            controls=controls,
            image=image,
            flow=flows,
        )
        if previews is not None:
            previews.remove_files()
        check_finite_latents(latents)
        # Frames stream into the mp4 as they are decoded (no second pass over the PNGs).
        written = write_frames(engine, latents, made, staging, job, events, fusion, frame_ids)
        if job.save_latents:
            latents_file = staging / "latents.npy"
            rows = [made.index(f) for f in frame_ids]
            with writing(latents_file):
                np.save(latents_file, latents[rows].numpy().astype(np.float32))
        resolved = resolved_job(job, out, (w, h), motion, allow_pickle, base)
        write_file(staging / "job.json", json.dumps(resolved, indent=2, sort_keys=True).encode())
        seconds = time.perf_counter() - started
        run_info = run_record(device, dtype_choice, base, seconds)
        if job.compile:
            run_info["compile"] = finish_report(compile_report, engine).to_dict()
        write_file(staging / "run.json", json.dumps(run_info, indent=2, sort_keys=True).encode())
    return JobResult(str(out), [str(out / n) for n in written], seconds, run_info)
