"""The benchmarked workloads: ours, the floor, plain Stable Diffusion, diffusers' Text2Video-Zero.

Each ``*_variant`` function prepares its inputs and returns a no-argument callable that
runs one whole generation (denoising and VAE decoding), so the timed region holds only the
work that differs between the variants.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.engine.compile import CompileOptions
from backend.engine.pipeline import ControlInput, TextToVideoZero, plan_generation
from backend.models.loading import BaseModel
from backend.protocol import resolve_t0_t1
from backend.service.runner import DECODE_SLICE

from .models import BenchModels

MODES = ("text2video", "controlnet", "pix2pix")
PROMPT = "a horse galloping on a street"
GUIDANCE = 7.5
IMAGE_GUIDANCE = 1.5
TEXT_TOKENS = 77

Runner = Callable[[], object]
# Makes the per-frame input tensors of a run (control frames or pix2pix source frames).
FrameInputs = Callable[[], Mapping[int, torch.Tensor]]


@dataclass(frozen=True)
class Workload:
    """One benchmarked job: the same for every variant."""

    mode: str
    frames: int
    size: int
    steps: int
    chunk_size: int
    seed: int = 0

    @property
    def motion(self) -> bool:
        """Motion dynamics (the frame-1-alone phase) run in text2video only."""
        return self.mode == "text2video"

    @property
    def t0_t1(self) -> tuple[int | None, int | None]:
        return resolve_t0_t1(self.steps) if self.motion else (None, None)

    @property
    def branches(self) -> int:
        return 3 if self.mode == "pix2pix" else 2

    def base(self, models: BenchModels) -> BaseModel:
        base = models.pix2pix if self.mode == "pix2pix" else models.base
        assert base is not None, f"{self.mode} needs its models"
        return base


def _frames(workload: Workload, salt: int) -> dict[int, torch.Tensor]:
    """Deterministic (3, H, W) pictures in [0, 1] per frame: control or source video."""
    gen = torch.Generator().manual_seed(workload.seed + salt)
    size = workload.size
    return {f: torch.rand(3, size, size, generator=gen) for f in range(workload.frames)}


def _decode_slices(base: BaseModel, latents: torch.Tensor) -> None:
    """The VAE decode every variant of ours and the floor does: DECODE_SLICE frames a call."""
    vae = base.vae
    for start in range(0, latents.shape[0], DECODE_SLICE):
        part = latents[start : start + DECODE_SLICE].to(base.device, base.dtype)
        vae.decode(part / vae.config.scaling_factor, return_dict=False)


# --------------------------------------------------------------------------- ours


def ours_variant(
    models: BenchModels,
    workload: Workload,
    inputs: FrameInputs | None = None,
    compile_options: CompileOptions | None = None,
) -> Runner:
    """Our engine as the runner drives it: generate, then decode in slices to uint8 frames.

    ``inputs`` makes the control (controlnet) or source (pix2pix) frames inside the run,
    e.g. read from files (see ``file_inputs``); by default they are made beforehand and
    held in memory. ``compile_options``: the UNet / ControlNet compiled (engine/compile.py).
    """
    base = workload.base(models)
    controlnets = [models.controlnet] if workload.mode == "controlnet" else []
    if inputs is None and workload.mode != "text2video":
        held = _frames(workload, 1 if controlnets else 2)
        inputs = lambda: held  # noqa: E731
    t0, t1 = workload.t0_t1

    def run() -> None:
        engine = TextToVideoZero(base, controlnets, compile_options=compile_options)
        frames = inputs() if inputs is not None else None
        controls = [ControlInput(models.controlnet, frames)] if controlnets else []
        latents = engine(
            prompt=PROMPT,
            num_frames=workload.frames,
            height=workload.size,
            width=workload.size,
            num_inference_steps=workload.steps,
            guidance_scale=GUIDANCE,
            seed=workload.seed,
            chunk_size=workload.chunk_size,
            motion_dynamics=workload.motion,
            t0=t0,
            t1=t1,
            controls=controls,
            image=frames if workload.mode == "pix2pix" else None,
            image_guidance_scale=IMAGE_GUIDANCE,
        )
        for start in range(0, workload.frames, DECODE_SLICE):
            engine.decode(latents[start : start + DECODE_SLICE])

    return run


def write_input_video(workload: Workload, folder: Path) -> Path:
    """The workload's control / source video as PNG files (random pixels, seeded)."""
    import numpy as np

    from backend.media.video_io import write_png

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(workload.seed)
    for f in range(workload.frames):
        image = rng.integers(0, 256, (workload.size, workload.size, 3), dtype=np.uint8)
        write_png(folder / f"frame_{f:05d}.png", image)
    return folder


def file_inputs(workload: Workload, folder: Path, streamed: bool) -> FrameInputs:
    """Frames read from ``folder`` as the runner reads them: ``streamed`` spools them and
    reads each chunk back while denoising (now); otherwise all are read up front (before)."""
    from backend.media.video_io import read_frames, store_frames
    from backend.protocol import VideoInput
    from backend.service.runner import TensorFrames, _to_tensor  # imported here, not in the run

    spec = VideoInput(str(folder))
    frames, size = range(workload.frames), workload.size
    if streamed:
        return lambda: TensorFrames(store_frames(spec, frames, size, size))
    return lambda: {f: _to_tensor(i) for f, i in read_frames(spec, frames, size, size).items()}


def text_encoding_variant(models: BenchModels, workload: Workload) -> Runner:
    """The prompt and negative prompt through the text encoder, as ``ours`` does once a run.

    Not a competitor: a part of ours that the floor leaves out by definition, timed so the
    table shows how much of ours minus floor it explains.
    """
    engine = TextToVideoZero(workload.base(models))

    def run() -> None:
        engine.encode_prompts(["", PROMPT])

    return run


# --------------------------------------------------------------------------- floor


def call_batches(workload: Workload) -> list[int]:
    """Frames per model call, in order: the evaluations the job needs and nothing more.

    text2video: (steps - t1 - 1) + (t1 - t0) calls on frame 1 alone, then (t1 + 1) steps
    over every chunk; controlnet and pix2pix: ``steps`` steps over every chunk. Each call
    holds every guidance branch of its frames.
    """
    t0, t1 = workload.t0_t1
    plan = plan_generation(
        range(workload.frames), workload.chunk_size, workload.steps, workload.motion, t0, t1
    )
    return plan.model_calls()


def floor_variant(models: BenchModels, workload: Workload) -> Runner:
    """Plain batched UNet (and ControlNet) calls with default attention, plus the same VAE work."""
    base = workload.base(models)
    dev, dtype, b = base.device, base.dtype, workload.branches
    latent = workload.size // base.vae_scale_factor
    batches = call_batches(workload)
    dim = base.unet.config.cross_attention_dim
    gen = torch.Generator().manual_seed(workload.seed)
    inputs = {}
    for n in sorted(set(batches)):
        x = torch.randn(b * n, base.in_channels, latent, latent, generator=gen)
        text = torch.randn(b * n, TEXT_TOKENS, dim, generator=gen)
        cond = torch.rand(b * n, 3, workload.size, workload.size, generator=gen)
        inputs[n] = (x.to(dev, dtype), text.to(dev, dtype), cond.to(dev, dtype))
    pixels = torch.rand(workload.frames, 3, workload.size, workload.size, generator=gen)
    pixels = pixels.to(dev, dtype)
    final = torch.randn(workload.frames, 4, latent, latent, generator=gen)
    t = torch.tensor(500, device=dev)

    def run() -> None:
        if workload.mode == "pix2pix":  # the source frames' latents, as the engine encodes them
            for start in range(0, workload.frames, 4):
                base.vae.encode(pixels[start : start + 4]).latent_dist.mode()
        for n in batches:
            x, text, cond = inputs[n]
            residuals = {}
            if workload.mode == "controlnet":
                down, mid = models.controlnet(
                    x, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False
                )
                residuals = {
                    "down_block_additional_residuals": down,
                    "mid_block_additional_residual": mid,
                }
            base.unet(x, t, encoder_hidden_states=text, return_dict=False, **residuals)
        _decode_slices(base, final)

    return run


# --------------------------------------------------------------------------- diffusers


def _quiet_diffusers() -> None:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _seeded(workload: Workload) -> torch.Generator:
    return torch.Generator().manual_seed(workload.seed)


def plain_sd_variant(models: BenchModels, workload: Workload) -> Runner:
    """diffusers' plain image pipeline for the mode, ``frames`` images in one batch."""
    from diffusers import (
        StableDiffusionControlNetPipeline,
        StableDiffusionInstructPix2PixPipeline,
        StableDiffusionPipeline,
    )

    _quiet_diffusers()
    base = workload.base(models)
    common = dict(
        num_inference_steps=workload.steps,
        guidance_scale=GUIDANCE,
        height=workload.size,
        width=workload.size,
        output_type="np",
    )
    prompts = [PROMPT] * workload.frames
    if workload.mode == "controlnet":
        pipe = StableDiffusionControlNetPipeline(
            controlnet=models.controlnet, **base.pipeline_components()
        )
        common["image"] = torch.stack(list(_frames(workload, 1).values()))
    elif workload.mode == "pix2pix":
        pipe = StableDiffusionInstructPix2PixPipeline(**base.pipeline_components())
        common["image"] = torch.stack(list(_frames(workload, 2).values()))
        common["image_guidance_scale"] = IMAGE_GUIDANCE
        del common["height"], common["width"]
    else:
        pipe = StableDiffusionPipeline(**base.pipeline_components())
    pipe.set_progress_bar_config(disable=True)
    return lambda: pipe(
        prompts, negative_prompt=[""] * workload.frames, generator=_seeded(workload), **common
    )


def diffusers_t2vz_available() -> bool:
    """True when the installed diffusers still ships TextToVideoZeroPipeline."""
    try:
        from diffusers import TextToVideoZeroPipeline  # noqa: F401
    except ImportError:
        return False
    return True


def diffusers_chunks(frames: int, chunk_size: int) -> list[list[int]]:
    """frame_ids per call of diffusers' documented long-video recipe (frame 0 leads every call)."""
    if chunk_size >= frames:
        return [list(range(frames))]
    starts = list(range(0, frames, chunk_size - 1))
    ends = starts[1:] + [frames]
    return [[0, *range(s, e)] for s, e in zip(starts, ends, strict=True)]


def diffusers_t2vz_variant(models: BenchModels, workload: Workload) -> Runner:
    """diffusers' TextToVideoZeroPipeline with our t0/t1; chunked by its frame_ids recipe."""
    from diffusers import TextToVideoZeroPipeline

    _quiet_diffusers()
    pipe = TextToVideoZeroPipeline(**workload.base(models).pipeline_components())
    pipe.set_progress_bar_config(disable=True)
    t0, t1 = workload.t0_t1
    chunks = diffusers_chunks(workload.frames, workload.chunk_size)

    def run() -> None:
        for frame_ids in chunks:
            pipe(
                prompt=PROMPT,
                negative_prompt="",
                video_length=len(frame_ids),
                frame_ids=frame_ids,
                height=workload.size,
                width=workload.size,
                num_inference_steps=workload.steps,
                guidance_scale=GUIDANCE,
                generator=_seeded(workload),
                t0=t0,
                t1=t1,
                output_type="np",
            )

    return run
