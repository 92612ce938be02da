"""Text2Video-Zero: one denoising loop for text2video, ControlNet video and Video Instruct-Pix2Pix.

The loop follows the paper (Khachatryan et al., ICCV 2023):

* Sect. 3.3.1, motion dynamics: frame 1 alone is denoised with DDIM from T to t1 and on
  to t0; its x_t0 is translated by delta^k = (k - 1) * (dx, dy) for every frame k and sent
  back to t1 with a DDPM forward jump; all frames are then denoised jointly from t1.
* Sect. 3.3.2, cross-frame attention: every self-attention layer attends to frame 1.
* Sect. 3.3.3, background smoothing: x^k <- M^k x^k + (1 - M^k)(a W_k(x^1) + (1 - a) x^k).
* Sect. 3.4, ControlNet video: the same x_T for every frame, one control image per frame.
* Sect. 3.5, Video Instruct-Pix2Pix: image latents concatenated to the input, three
  guidance branches (text+image, image, none) under cross-frame attention.

Long videos run step-major in chunks: each denoising step visits every chunk, the chunk
holding frame 1 first, so the anchor's keys/values are computed once per step and shared.
A frame's noise depends only on (seed, frame index), so results do not depend on the chunk
size and any subset of frames can be computed on its own (render-farm shards).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..models.families import (
    TextConditioning,
    added_conditions,
    check_model,
    encode_text,
    latents_for_vae,
    repeat_conditions,
    vae_upcast,
)
from ..models.loading import BaseModel
from .attention import AnchorState, CrossAttnMapRecorder, installed_processors
from .compile import CompileOptions, forwards
from .flow import FlowFusion, fuse, fuse_sequence, resize_mask, warp
from .motion import (
    background_mask,
    ddpm_jump,
    frame_noise,
    latent_shift,
    motion_shifts,
    smooth_background,
    translate_latents,
)

log = logging.getLogger(__name__)

# Fraction of the joint denoising steps whose cross-attention maps make the smoothing masks.
MASK_RECORD_FRACTION = 0.2
# Normalised cross-attention above which a latent pixel counts as foreground.
MASK_THRESHOLD = 0.4
# When background smoothing blends (Sect. 3.3.3): "once" at x_t1 (the paper) or after
# "every_step" of the joint phase (an older variant, kept to measure against).
SMOOTH_SCHEDULES = ("once", "every_step")
# x_T of the frames without motion dynamics: frame 1's for all ("shared", Sect. 3.4) or
# each frame's own ("per_frame", the official pix2pix code's choice).
INITIAL_NOISES = ("shared", "per_frame")
# Frame-to-frame consistency: "paper", cross-frame attention to frame 1 alone (Sect. 3.3.2);
# "flow", also each frame's predicted clean latent fused with the previous frame's along the
# input's motion (Rerender-A-Video; engine/flow.py). Under "flow" frame k depends on k - 1.
CONSISTENCIES = ("paper", "flow")


class Cancelled(Exception):
    """The job was cancelled between two model evaluations."""


@dataclass
class Callbacks:
    """Hooks the engine calls; all optional. ``should_cancel`` is polled before every UNet call."""

    progress: Callable[[int, int, float], None] | None = None  # (step, total steps, fraction)
    should_cancel: Callable[[], bool] | None = None
    # After each joint step: (step, frame 1's predicted clean latent, (1, 4, h, w)).
    anchor_preview: Callable[[int, torch.Tensor], None] | None = None


@dataclass
class ControlInput:
    """A loaded ControlNet with its control frames for the frames being generated."""

    model: torch.nn.Module
    # frame index -> (3, H, W) image: uint8 in [0, 255] or float in [0, 1]. Indexed one
    # chunk at a time, so a lazy mapping (the runner's frames read from disk) keeps memory
    # flat in video length.
    frames: Mapping[int, torch.Tensor]
    weight: float = 1.0
    # A union ControlNet (ControlNetUnionModel: one model, many kinds of control): which
    # kind these frames are, as the model numbers them (xinsir's: 0 openpose, 1 depth,
    # 2 soft edges, 3 canny/lineart/mlsd, 4 normal, 5 segmentation, 6 tile). None otherwise.
    control_type: int | None = None


def is_union(model: torch.nn.Module) -> bool:
    """True for a union ControlNet (its config numbers the control types it knows)."""
    return hasattr(model.config, "num_control_type")


@dataclass
class GenerationPlan:
    """Which frames are computed, in which chunks, and which DDIM steps each phase runs."""

    frame_ids: list[int]  # frames the caller asked for (0-based, sorted)
    processed: list[int]  # frame_ids plus frame 0, the anchor every frame attends to
    chunks: list[list[int]]  # processed frames split into chunks; chunks[0][0] == 0
    steps: int
    motion_phase: bool
    t0: int | None = None
    t1: int | None = None
    # Joint steps run a first time only to record smoothing masks (Sect. 3.3.3, "once").
    mask_steps: int = 0
    evaluations: int = field(init=False)  # frame evaluations of the UNet, for progress

    def __post_init__(self) -> None:
        self.evaluations = sum(self.model_calls())

    @property
    def anchor_steps(self) -> int:
        """DDIM steps frame 1 runs alone (T -> t1 -> t0) before the others exist."""
        return self.steps - self.t0 - 1 if self.motion_phase else 0

    @property
    def joint_start(self) -> int:
        """Index of the first DDIM step that denoises all frames together."""
        return self.steps - self.t1 - 1 if self.motion_phase else 0

    def model_calls(self) -> list[int]:
        """Frames in each UNet call, in the order the loop makes them."""
        joint = [len(chunk) for _ in range(self.joint_start, self.steps) for chunk in self.chunks]
        masks = [len(chunk) for _ in range(self.mask_steps) for chunk in self.chunks]
        return [1] * self.anchor_steps + masks + joint


def plan_generation(
    frame_ids: Sequence[int],
    chunk_size: int,
    steps: int,
    motion_phase: bool,
    t0: int | None = None,
    t1: int | None = None,
    mask_steps: int = 0,
    sequential: bool = False,
) -> GenerationPlan:
    """Split the frames into anchored chunks and fix the phases of the loop.

    ``sequential`` (flow consistency: frame k depends on k - 1) processes every frame from
    frame 1 to the last one asked for, so a frame range is exact at the cost of recomputing
    the frames before it.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if motion_phase and (t0 is None or t1 is None or not 0 <= t0 < t1 < steps):
        raise ValueError(f"motion dynamics need 0 <= t0 < t1 < steps, got t0={t0}, t1={t1}")
    wanted = sorted(set(frame_ids))
    processed = list(range(max(wanted) + 1)) if sequential else sorted(set(wanted) | {0})
    chunks = [processed[i : i + chunk_size] for i in range(0, len(processed), chunk_size)]
    return GenerationPlan(wanted, processed, chunks, steps, motion_phase, t0, t1, mask_steps)


class TextToVideoZero:
    """The engine: SD 1.x, 2.x or SDXL components plus optional ControlNets, run as
    Text2Video-Zero. What differs between families (text encoders, added conditions, VAE
    quirks) comes from ``backend.models.families``; the loop is the same for all."""

    def __init__(
        self,
        base: BaseModel,
        controlnets: Sequence[torch.nn.Module] = (),
        compile_options: CompileOptions | None = None,
    ):
        check_model(base, controlnets)
        self.base = base
        self.controlnets = list(controlnets)
        self.device = base.device
        self.dtype = base.dtype
        # What runs the UNet and each ControlNet: the modules, or (``compile_options``) their
        # compiled forwards, made once per module and reused by every engine on it.
        modules = [base.unet, *self.controlnets]
        calls, self.compile_skipped = forwards(modules, compile_options, self.device)
        self._unet_call, self._controlnet_calls = calls[0], calls[1:]

    @property
    def forward_calls(self) -> list:
        """What runs the UNet and each ControlNet (compiled wrappers, or the modules)."""
        return [self._unet_call, *self._controlnet_calls]

    # ------------------------------------------------------------------ inputs

    def check_inputs(
        self,
        prompt: str,
        height: int,
        width: int,
        num_frames: int,
        frame_ids: Sequence[int],
        controls: Sequence[ControlInput],
        image: Mapping[int, torch.Tensor] | None,
    ) -> None:
        """Raise ValueError naming the bad value before any model runs."""
        factor = self.base.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be divisible by {factor}, got {height}x{width}"
            )
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        if not frame_ids or min(frame_ids) < 0 or max(frame_ids) >= num_frames:
            raise ValueError(f"frame_ids must lie in [0, {num_frames}), got {list(frame_ids)}")
        if len(controls) != len(self.controlnets):
            raise ValueError(
                f"{len(self.controlnets)} ControlNets need as many control videos, "
                f"got {len(controls)}"
            )
        needed = sorted(set(frame_ids) | {0})
        for i, control in enumerate(controls):
            if control.model is not self.controlnets[i]:
                raise ValueError(
                    f"controls[{i}] is for another ControlNet than the engine's ControlNet {i}: "
                    "give the control videos in the order of the engine's ControlNets"
                )
            missing = [f for f in needed if f not in control.frames]
            if missing:
                raise ValueError(f"control video {i} has no frame for frames {missing[:5]}")
            kinds = int(getattr(control.model.config, "num_control_type", 0))
            if is_union(control.model) and not (
                control.control_type is not None and 0 <= control.control_type < kinds
            ):
                raise ValueError(
                    f"controls[{i}] is for a union ControlNet: its control_type must be one of "
                    f"0..{kinds - 1}, got {control.control_type}"
                )
            if not is_union(control.model) and control.control_type is not None:
                raise ValueError(
                    f"controls[{i}].control_type is {control.control_type}, but its ControlNet "
                    "is not a union ControlNet (it knows one kind of control)"
                )
        if self.base.in_channels == 8:
            if image is None:
                raise ValueError("an InstructPix2Pix model needs a source video (image)")
            missing = [f for f in needed if f not in image]
            if missing:
                raise ValueError(f"source video has no frame for frames {missing[:5]}")
        elif image is not None:
            raise ValueError("a source video (image) needs an InstructPix2Pix model")

    # ------------------------------------------------------------------ text

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompts, 77, dim) text embeddings in one call per text encoder, and (prompts, 77)
        masks of each prompt's own tokens (no start, end or padding)."""
        text = self.encode_text(prompts)
        return text.embeds, text.own

    def encode_text(
        self, prompts: Sequence[str], negatives: Sequence[bool] = ()
    ) -> TextConditioning:
        """The prompts as the model's family encodes them (SDXL: both encoders and pooled);
        ``negatives`` marks negative prompts (an empty one may become zeros, SDXL)."""
        return encode_text(self.base, prompts, negatives)

    # ------------------------------------------------------------------ model calls

    def _noise_prediction(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        frames: list[int],
        embeds: torch.Tensor,
        controls: Sequence[ControlInput],
        image_latents: dict[int, torch.Tensor] | None,
        guidance: tuple[float, float],
        branches: int,
        added: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Guided noise prediction for a chunk: every branch's frames in one batched call.

        ``added``: each branch's added conditions (SDXL's pooled text and size ids), or None.
        """
        n = len(frames)
        model_input = latents.repeat(branches, 1, 1, 1)  # (branches * frames, 4, h, w)
        if image_latents is not None:
            chunk_image = torch.stack([image_latents[f] for f in frames])  # (frames, 4, h, w)
            groups = [chunk_image, chunk_image, torch.zeros_like(chunk_image)][:branches]
            model_input = torch.cat([model_input, torch.cat(groups)], dim=1)
            # (branches * frames, 8, h, w): latents next to the source frame's latents
        text = embeds.repeat_interleave(n, dim=0)  # (branches * frames, 77, dim)
        added_cond = repeat_conditions(added, n)  # rows as ``text``, or None

        down_residuals = mid_residual = None
        for control, controlnet in zip(controls, self._controlnet_calls, strict=True):
            cond = _unit_range(torch.stack([control.frames[f] for f in frames]))
            cond = cond.to(self.device, self.dtype)
            cond = cond.repeat(branches, 1, 1, 1)  # (branches * frames, 3, H, W)
            if is_union(control.model):
                down, mid = _union_residuals(
                    controlnet, control, cond, model_input, t, text, added_cond, self._anchors
                )
            else:
                down, mid = controlnet(
                    model_input,
                    t,
                    encoder_hidden_states=text,
                    controlnet_cond=cond,
                    conditioning_scale=control.weight,
                    added_cond_kwargs=added_cond,
                    return_dict=False,
                )
            if down_residuals is None:
                down_residuals, mid_residual = list(down), mid
            else:
                down_residuals = [a + b for a, b in zip(down_residuals, down, strict=True)]
                mid_residual = mid_residual + mid

        noise = self._unet_call(
            model_input,
            t,
            encoder_hidden_states=text,
            down_block_additional_residuals=down_residuals,
            mid_block_additional_residual=mid_residual,
            added_cond_kwargs=added_cond,
            return_dict=False,
        )[0]
        return _combine_guidance(noise, branches, n, image_latents is not None, guidance)

    # ------------------------------------------------------------------ the loop

    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        num_frames: int = 8,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        seed: int = 0,
        chunk_size: int = 8,
        frame_ids: Sequence[int] | None = None,
        motion: tuple[float, float] = (12.0, 12.0),
        motion_dynamics: bool = True,
        t0: int | None = None,
        t1: int | None = None,
        smooth_bg: bool = False,
        smooth_alpha: float = 0.6,
        masks: Mapping[int, torch.Tensor] | None = None,
        controls: Sequence[ControlInput] = (),
        image: Mapping[int, torch.Tensor] | None = None,
        image_guidance_scale: float = 1.5,
        callbacks: Callbacks | None = None,
        cross_frame_attention: bool = True,
        smooth_schedule: str = "once",
        initial_noise: str = "shared",
        consistency: str = "paper",
        flow: Mapping[int, torch.Tensor] | None = None,
        flow_fusion: FlowFusion | None = None,
    ) -> torch.Tensor:
        """Generate and return the final latents of ``frame_ids``: (frames, 4, H/8, W/8) fp32.

        ``image`` (pix2pix) maps frame index -> (3, H, W) source frame (uint8, or float in
        [0, 1]); ``masks`` maps frame index -> (1, H, W) foreground mask in [0, 1].
        ``cross_frame_attention=False`` leaves self-attention per frame (Sect. 3.3.2 off: the
        paper's ablation); everything else, background smoothing's maps included, still runs.
        ``smooth_schedule`` (with ``smooth_bg``): "once", the paper's blend at x_t1 after a
        first pass for the masks; "every_step", the older blend after every joint step from
        the masks on (kept to measure against). ``initial_noise`` without motion dynamics
        (ControlNet, pix2pix): "shared", every frame starts from frame 1's x_T (Sect. 3.4);
        "per_frame", each from its own (seed, frame) noise. ``consistency="flow"`` fuses each
        frame's predicted clean latent with the previous frame's, warped by ``flow``: frame
        index k -> (3, H/8, W/8), the backward flow from frame k to k - 1 in latent pixels
        (channels 0-1, x right and y down) and where frame k is visible in k - 1 (channel 2,
        in [0, 1]), for every frame but the first; ``flow_fusion`` says when and how strongly
        (default ``FlowFusion()``). Chunks are visited in frame order within each step and the
        last fused latent is carried across chunk boundaries, so the result does not depend
        on the chunk size; a frame range computes every frame before it too.
        """
        frame_ids = list(range(num_frames)) if frame_ids is None else list(frame_ids)
        self.check_inputs(prompt, height, width, num_frames, frame_ids, controls, image)
        if smooth_schedule not in SMOOTH_SCHEDULES:
            raise ValueError(
                f"smooth_schedule must be one of {', '.join(SMOOTH_SCHEDULES)}, "
                f"got {smooth_schedule!r}"
            )
        if initial_noise not in INITIAL_NOISES:
            raise ValueError(
                f"initial_noise must be one of {', '.join(INITIAL_NOISES)}, got {initial_noise!r}"
            )
        if consistency not in CONSISTENCIES:
            raise ValueError(
                f"consistency must be one of {', '.join(CONSISTENCIES)}, got {consistency!r}"
            )
        if consistency == "flow" and flow is None:
            raise ValueError('consistency "flow" needs flow: frame -> (3, h, w) flow and mask')
        if consistency == "paper" and flow is not None:
            raise ValueError('flow is used only with consistency "flow"')
        if smooth_bg and image is not None:
            raise ValueError(
                "smooth_bg is for text2video and ControlNet video: pix2pix follows its moving "
                "source video, which a blend toward frame 1 would freeze"
            )
        callbacks = callbacks or Callbacks()
        sequential = consistency == "flow"
        plan = plan_generation(
            frame_ids, chunk_size, num_inference_steps, motion_dynamics, t0, t1,
            sequential=sequential,
        )  # fmt: skip
        joint_steps = num_inference_steps - plan.joint_start
        mask_record_steps = max(1, round(joint_steps * MASK_RECORD_FRACTION))
        if smooth_bg and masks is None and smooth_schedule == "once" and len(plan.processed) > 1:
            plan = plan_generation(
                frame_ids, chunk_size, num_inference_steps, motion_dynamics, t0, t1,
                mask_steps=mask_record_steps, sequential=sequential,
            )  # fmt: skip
        scheduler = _ddim(self.base.scheduler_config)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = scheduler.timesteps
        if int(timesteps.max()) >= scheduler.config.num_train_timesteps:  # steps_offset
            raise ValueError(
                f"num_inference_steps must be at most {num_inference_steps - 1} for this "
                f"model's {scheduler.config.num_train_timesteps}-step schedule, "
                f"got {num_inference_steps}"
            )
        factor = self.base.vae_scale_factor
        lat_h, lat_w = height // factor, width // factor
        shape = (4, lat_h, lat_w)
        shift = latent_shift(motion, lat_w, lat_h)
        if flow is not None:
            _check_flow_frames(flow, plan.processed[1:], (lat_h, lat_w))
        fusion = (flow_fusion or FlowFusion()) if flow is not None else None
        if (
            fusion is not None
            and fusion.pixel_aware
            and not callable(getattr(flow, "pixels", None))
        ):
            raise ValueError(
                "pixel-aware flow fusion (FlowFusion.pixel_aware) needs a flow with pixels(k): "
                "the full-resolution flow (media/flow.py)"
            )

        # Text and guidance branches: (uncond, cond), or (text+image, image, none) for Pix2Pix.
        pix2pix = image is not None
        if pix2pix:
            do_cfg = guidance_scale > 1.0 and image_guidance_scale >= 1.0
            encoded = self.encode_text(
                [prompt, negative_prompt] if do_cfg else [prompt], negatives=[False, True]
            )
            text = encoded.rows([0, 1, 1]) if do_cfg else encoded
            branches, cond_branch = (3 if do_cfg else 1), 0
        else:
            do_cfg = guidance_scale > 1.0
            text = self.encode_text(
                [negative_prompt, prompt] if do_cfg else [prompt], negatives=[do_cfg, False]
            )
            branches = 2 if do_cfg else 1
            cond_branch = branches - 1
        embeds, own_tokens = text.embeds, text.own[cond_branch]
        # The family's added conditions per branch (SDXL: pooled text, size ids), or None.
        added = added_conditions(text, height, width, self.device, self.dtype)
        guidance = (guidance_scale, image_guidance_scale)
        image_latents = self._encode_images(image, plan.processed) if pix2pix else None

        state = AnchorState()
        state.branches = branches
        self._anchors = state  # union ControlNets call a frame at a time (_union_residuals)
        recorder = None
        if smooth_bg and masks is None:
            recorder = CrossAttnMapRecorder((lat_h, lat_w), own_tokens, cond_branch)
        models = [("unet", self.base.unet)] + [
            (f"controlnet{i}", c) for i, c in enumerate(self.controlnets)
        ]
        done = 0

        def predict(latents: torch.Tensor, t: torch.Tensor, frames: list[int]) -> torch.Tensor:
            nonlocal done
            if callbacks.should_cancel is not None and callbacks.should_cancel():
                raise Cancelled()
            noise = self._noise_prediction(
                latents, t, frames, embeds, controls, image_latents, guidance, branches, added
            )
            done += len(frames)
            return noise

        def report(step: int) -> None:
            if callbacks.progress is not None:
                callbacks.progress(step, num_inference_steps, done / plan.evaluations)

        # torch.no_grad() as a block here and in the methods below, not as a decorator:
        # mutmut leaves decorated functions unmutated (docs/mutation.md).
        with (
            torch.no_grad(),
            installed_processors(
                models, state, recorder, lat_h * lat_w, cross_frame=cross_frame_attention
            ),
        ):
            # x_T: frame 1's noise; ControlNet and Pix2Pix start every frame from it (Sect. 3.4).
            x_first = frame_noise(seed, 0, "x_T", shape).to(self.device, self.dtype)
            x_first = x_first * scheduler.init_noise_sigma
            others = plan.processed[1:]  # every processed frame but the anchor
            others_shift = motion_shifts(others, shift)  # (frames - 1, 2) latent pixels

            if plan.motion_phase:
                # Sect. 3.3.1: DDIM backward on frame 1 alone, T -> t1 -> t0.
                t0_index = plan.anchor_steps  # step index of x_t0
                x_first = x_first[None]  # (1, 4, h, w)
                x_first_t1 = x_first if plan.joint_start == 0 else None
                for i in range(t0_index):
                    state.capture = True
                    t = timesteps[i]
                    noise = predict(x_first, t, [0])
                    x_first = scheduler.step(noise, t, x_first).prev_sample
                    if i + 1 == plan.joint_start:
                        x_first_t1 = x_first
                    report(i + 1)
                # Warp x_t0^1 by delta^k for every other frame, then DDPM-forward t0 -> t1.
                latents = torch.cat([x_first_t1, x_first.expand(len(others), *shape)])
                # (frames, 4, h, w), in plan.processed order
                if others:
                    alphas = scheduler.alphas_cumprod
                    a_t0 = float(alphas[int(timesteps[t0_index])])
                    a_t1 = float(alphas[int(timesteps[plan.joint_start])])
                    eps = torch.stack([frame_noise(seed, f, "t0_to_t1", shape) for f in others])
                    warped = translate_latents(latents[1:], others_shift)
                    latents[1:] = ddpm_jump(warped, a_t0, a_t1, eps)
            elif initial_noise == "per_frame":
                # Every frame its own x_T (the official pix2pix's choice, measured against).
                latents = torch.stack([frame_noise(seed, f, "x_T", shape) for f in plan.processed])
                latents = latents.to(self.device, self.dtype) * scheduler.init_noise_sigma
                # (frames, 4, h, w); frame 1's is x_first
            else:
                latents = x_first.expand(len(plan.processed), *shape).clone()
                # (frames, 4, h, w): every frame starts from the anchor's x_T

            # Sect. 3.3.2 / 3.4 / 3.5: all frames jointly, cross-frame attention to frame 1.
            def denoise(latents: torch.Tensor, stop: int, every_step_blend: bool) -> None:
                """Joint DDIM steps joint_start .. stop - 1 over every chunk, in place."""
                nonlocal fg_others
                for i in range(plan.joint_start, stop):
                    t = timesteps[i]
                    fusing = fusion is not None and fusion.active(
                        i, plan.joint_start, num_inference_steps
                    )
                    carried = None  # the previous frame's fused x0, across chunk boundaries
                    if recorder is not None:
                        recorder.active = i < record_until
                    start = 0
                    for n, chunk in enumerate(plan.chunks):
                        state.capture = n == 0
                        if recorder is not None:
                            recorder.frame_ids = chunk
                        rows = slice(start, start + len(chunk))  # chunks are runs of processed
                        noise = predict(latents[rows], t, chunk)
                        stepped = scheduler.step(noise, t, latents[rows])
                        if fusing:
                            # Rerender-A-Video's fusion (engine/flow.py), then the DDIM step
                            # redone with the fused x0 and the same noise estimate.
                            x0 = stepped.pred_original_sample
                            # Frame 1 (first of chunk 0) has no predecessor and no flow.
                            flows = [flow[f] for f in chunk if f != 0]
                            flows = torch.stack(flows) if flows else x0.new_zeros(0, 3, *shape[1:])
                            flows = flows.to(self.device, x0.dtype)  # (frames, 3, h, w)
                            previous = carried if chunk[0] != 0 else None
                            if fusion.pixel_aware:
                                fused = self._fuse_pixel_aware(x0, previous, chunk, flow, fusion)
                            else:
                                fused = fuse_sequence(x0, previous, flows, fusion.strength)
                            carried = fused[-1:]
                            a_prev = _alpha_prev(scheduler, t)
                            latents[rows] = stepped.prev_sample + a_prev**0.5 * (fused - x0)
                        else:
                            latents[rows] = stepped.prev_sample
                        if n == 0:
                            anchor_x0 = stepped.pred_original_sample[:1]  # (1, 4, h, w)
                        start += len(chunk)
                        report(i + 1)
                    state.clear()
                    if callbacks.anchor_preview is not None:
                        callbacks.anchor_preview(i + 1, anchor_x0)
                    if not every_step_blend:
                        continue
                    if fg_others is None and recorder is not None and i + 1 == record_until:
                        fg_others = _stack_masks(_attention_masks(recorder.maps), others)
                    if fg_others is not None and i + 1 < num_inference_steps:
                        # The every-step variant of Sect. 3.3.3 (measured against, not the
                        # paper's): blend each background toward frame 1, warped to frame k.
                        anchor = latents[:1].expand(len(others), *shape)
                        warped = translate_latents(anchor, others_shift)
                        latents[1:] = smooth_background(
                            latents[1:], warped, fg_others, smooth_alpha
                        )

            record_until = plan.joint_start + mask_record_steps
            fg_all = None  # (processed, 1, h, w) foreground masks M^k, 1 = foreground
            if smooth_bg and masks is not None:
                fg_all = _stack_masks(_masks_to_latent(masks, (lat_h, lat_w)), plan.processed)
            fg_others = None if fg_all is None else fg_all[1:]
            if smooth_bg and smooth_schedule == "once" and others:
                if fg_all is None:
                    # Sect. 3.3.3: a first pass for the masks (here the prompt's cross-attention
                    # over the first joint steps), then back to x_t1.
                    x_t1 = latents.clone()
                    denoise(latents, record_until, every_step_blend=False)
                    fg_all = _stack_masks(_attention_masks(recorder.maps), plan.processed)
                    recorder.active = False  # the processors keep it: stop recording for good
                    latents = x_t1
                # Blend once at x_t1, frame 1's foreground kept out of frame k's background.
                anchor = latents[:1].expand(len(others), *shape)  # (frames - 1, 4, h, w)
                anchor_fg = fg_all[:1].expand(len(others), -1, -1, -1)  # (frames - 1, 1, h, w)
                background = background_mask(fg_all[1:], translate_latents(anchor_fg, others_shift))
                latents[1:] = smooth_background(
                    latents[1:],
                    translate_latents(anchor, others_shift),
                    1 - background,
                    smooth_alpha,
                )
                denoise(latents, num_inference_steps, every_step_blend=False)
            else:
                denoise(latents, num_inference_steps, every_step_blend=smooth_bg)

        rows = [plan.processed.index(f) for f in plan.frame_ids]
        return latents[rows].float()

    # ------------------------------------------------------------------ VAE

    def _fuse_pixel_aware(
        self,
        x0: torch.Tensor,
        previous: torch.Tensor | None,
        chunk: Sequence[int],
        flow: Any,
        fusion: FlowFusion,
    ) -> torch.Tensor:
        """A chunk's x0 (frames, 4, h, w) fused in frame order: each frame with the fused one
        before it (``previous`` for the chunk's first; none for frame 1), first along the
        latent flow, then pixel-aware: the previous fused x0 decoded, warped along
        ``flow.pixels(k)`` at full resolution and re-encoded (Rerender-A-Video Sect. 4.1)."""
        out = x0.clone()
        for i, f in enumerate(chunk):
            before = out[i - 1 : i] if i else previous
            if f == 0 or before is None:
                continue
            small = flow[f].to(self.device, x0.dtype)[None]  # (1, 3, h, w)
            fused = fuse(x0[i : i + 1], before, small[:, :2], small[:, 2:], fusion.strength)
            pixel = flow.pixels(f).to(self.device, torch.float32)[None]  # (1, 3, H, W)
            warped = self._warp_through_vae(before, pixel[:, :2]).to(x0.dtype)  # (1, 4, h, w)
            if fusion.pixel_aware_relative:  # only what the warp moved, not the VAE's loss
                warped = fused + warped - self._warp_through_vae(fused, None).to(x0.dtype)
            mask = resize_mask(pixel[:, 2:], tuple(x0.shape[-2:]), fusion.pixel_aware_visible)
            weight = fusion.pixel_aware * mask.to(x0.dtype)
            out[i : i + 1] = fused + weight * (warped - fused)
        return out

    def _warp_through_vae(
        self, latents: torch.Tensor, pixel_flow: torch.Tensor | None
    ) -> torch.Tensor:
        """(1, 4, h, w) model latents decoded, warped along a (1, 2, H, W) pixel flow and
        encoded again (the posterior's mean), as model latents. The round trip runs in
        float32 (a float16 or bfloat16 VAE is cast there and back: exact)."""
        vae = self.base.vae
        dtype = vae.dtype
        if dtype != torch.float32:
            vae.float()
        try:
            x = latents_for_vae(vae, latents.float())
            image = vae.decode(x, return_dict=False)[0].float().clamp(-1, 1)  # (1, 3, H, W)
            moved = image if pixel_flow is None else warp(image, pixel_flow)
            z = vae.encode(moved).latent_dist.mean  # (1, 4, h, w) VAE latents
        finally:
            if dtype != torch.float32:
                vae.to(dtype)
        return _vae_to_latents(vae, z)

    def _encode_images(
        self, image: Mapping[int, torch.Tensor], frames: list[int], batch: int = 4
    ) -> dict[int, torch.Tensor]:
        """InstructPix2Pix image latents (the VAE posterior's mode, unscaled) per frame."""
        with torch.no_grad():
            # Encoded once, ``batch`` frames a VAE call, and kept for every frame: as small as
            # the latents the loop keeps anyway (1/12 of a uint8 frame); encoding per chunk
            # would run the VAE encoder again at every step.
            out = {}
            vae = self.base.vae
            upcast = vae_upcast(self.base)  # SDXL's VAE encodes in float32 (force_upcast)
            if upcast:
                vae.float()
            try:
                for i in range(0, len(frames), batch):
                    part = frames[i : i + batch]
                    pixels = _unit_range(torch.stack([image[f] for f in part]))
                    pixels = pixels.to(self.device, vae.dtype) * 2 - 1
                    encoded = vae.encode(pixels).latent_dist.mode()  # (part, 4, h, w)
                    out.update(zip(part, encoded.to(self.dtype), strict=True))
            finally:
                if upcast:
                    vae.half()
            return out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode (frames, 4, h, w) latents to (frames, H, W, 3) uint8 RGB on the CPU.

        The VAE decodes in its own dtype, as diffusers' SD 1.x pipelines do (its config's
        ``force_upcast`` is an SDXL-pipeline setting, and a class default for SD 1.x VAEs);
        a float16 decode whose output holds a NaN or inf (an overflow: black frames) is
        redone in float32. An SDXL VAE whose config says ``force_upcast`` decodes in float32
        straight away, as diffusers' SDXL pipelines do (``families.vae_upcast``).
        """
        with torch.no_grad():
            vae = self.base.vae
            x = latents_for_vae(vae, latents.to(self.device))
            if vae_upcast(self.base):
                images = _decode_in_float32(vae, x)
            else:
                images = vae.decode(x.to(vae.dtype), return_dict=False)[0]  # (frames, 3, H, W)
            if vae.dtype == torch.float16 and not torch.isfinite(images).all():
                log.warning("the VAE overflowed in float16 (NaN/inf); decoding in float32")
                images = _decode_in_float32(vae, x)
            images = ((images.float() + 1) * 127.5).round().clamp(0, 255)  # from [-1, 1]
            return images.to(torch.uint8).permute(0, 2, 3, 1).cpu()


def _vae_to_latents(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """VAE latents to model latents: the inverse of ``families.latents_for_vae``."""
    config = vae.config
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        std_t = torch.tensor(std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        return (z - mean_t) * config.scaling_factor / std_t
    return z * config.scaling_factor


def _check_flow_frames(
    flow: Mapping[int, torch.Tensor], frames: list[int], size: tuple[int, int]
) -> None:
    """Raise ValueError unless every frame has a (3, h, w) flow-and-mask at latent size."""
    missing = [f for f in frames if f not in flow]
    if missing:
        raise ValueError(f"flow has no entry for frames {missing[:5]}")
    for f in frames[:1] + frames[-1:]:
        if tuple(flow[f].shape) != (3, *size):
            raise ValueError(
                f"flow[{f}] must be (3, {size[0]}, {size[1]}) (flow x, flow y, visibility at "
                f"the latent grid), got {tuple(flow[f].shape)}"
            )


def _alpha_prev(scheduler, t: torch.Tensor) -> float:
    """alphas_cumprod of the step DDIM moves to from ``t`` (as DDIMScheduler.step finds it)."""
    prev = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    if prev >= 0:
        return float(scheduler.alphas_cumprod[prev])
    return float(scheduler.final_alpha_cumprod)


def _decode_in_float32(vae: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(frames, 3, H, W) float32 images from a float16 VAE upcast for this call only."""
    vae.float()  # float()/half(), not to(dtype): diffusers warns on every to(dtype)
    try:
        return vae.decode(x.float(), return_dict=False)[0]
    finally:
        vae.half()


_SCHEDULERS: dict[str, object] = {}  # scheduler config (JSON) -> unused DDIM scheduler


def _union_residuals(
    controlnet: Any,
    control: ControlInput,
    cond: torch.Tensor,
    model_input: torch.Tensor,
    t: torch.Tensor,
    text: torch.Tensor,
    added: dict[str, torch.Tensor] | None,
    anchors: AnchorState,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A union ControlNet's residuals for a chunk, one frame (all its guidance branches) a
    call, as diffusers' union pipeline calls it for one image.

    Its condition transformer (``nn.MultiheadAttention`` without ``batch_first``) attends
    across the batch: a chunk of frames in one call would mix the frames, and a frame's
    result would depend on the chunk it is in. In the chunk holding frame 1, only the
    first call (frame 1) stores the anchor keys/values its layers' later calls read.
    """
    branches = anchors.branches
    frames = cond.shape[0] // branches
    kinds = int(controlnet.config.num_control_type)
    one_hot = torch.zeros(branches, kinds, device=cond.device, dtype=cond.dtype)
    one_hot[:, control.control_type] = 1
    downs, mids = [], []
    capture = anchors.capture
    try:
        for j in range(frames):
            anchors.capture = capture and j == 0
            rows = torch.arange(branches, device=cond.device) * frames + j  # frame j, each branch
            down, mid = controlnet(
                model_input[rows],
                t,
                encoder_hidden_states=text[rows],
                controlnet_cond=[cond[rows]],
                control_type=one_hot,
                control_type_idx=[control.control_type],
                conditioning_scale=[control.weight],
                added_cond_kwargs=None if added is None else {k: v[rows] for k, v in added.items()},
                return_dict=False,
            )
            downs.append(down)
            mids.append(mid)
    finally:
        anchors.capture = capture  # the UNet's layers store their own anchor next

    def batch(parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-frame (branches, ...) outputs back in the chunk's branch-major order."""
        stacked = torch.stack(parts, dim=1)  # (branches, frames, ...)
        return stacked.reshape(branches * frames, *stacked.shape[2:])

    return [batch(list(level)) for level in zip(*downs, strict=True)], batch(mids)


def _unit_range(images: torch.Tensor) -> torch.Tensor:
    """Images as floats in [0, 1]: uint8 ones are scaled, float ones kept."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images


def _ddim(config: dict):
    """A fresh DDIM scheduler (eta = 0: deterministic) from the model's scheduler config.

    Built once per config and copied afterwards: ``from_config`` costs about a millisecond.
    """
    from diffusers import DDIMScheduler

    key = json.dumps(config, sort_keys=True, default=repr)
    template = _SCHEDULERS.get(key)
    if template is None:
        if len(_SCHEDULERS) >= 8:
            _SCHEDULERS.clear()
        template = _SCHEDULERS[key] = DDIMScheduler.from_config(config)
    return copy.deepcopy(template)


def _combine_guidance(
    noise: torch.Tensor, branches: int, frames: int, pix2pix: bool, guidance: tuple[float, float]
) -> torch.Tensor:
    """Classifier-free guidance over the stacked branches of one chunk."""
    if branches == 1:
        return noise
    text_scale, image_scale = guidance
    parts = noise.view(branches, frames, *noise.shape[1:])  # (branches, frames, 4, h, w)
    if pix2pix:
        full, image_only, none = parts.unbind(0)
        return none + text_scale * (full - image_only) + image_scale * (image_only - none)
    uncond, cond = parts.unbind(0)
    return uncond + text_scale * (cond - uncond)


def _masks_to_latent(
    masks: Mapping[int, torch.Tensor], size: tuple[int, int]
) -> dict[int, torch.Tensor]:
    """Foreground masks at latent resolution, 1 on the foreground and 0 on the background."""
    out = {}
    for f, m in masks.items():
        small = F.interpolate(m[None].float(), size=size, mode="area")[0]  # (1, h, w)
        out[f] = (small >= 0.5).float()
    return out


def _stack_masks(masks: dict[int, torch.Tensor], frames: list[int]) -> torch.Tensor:
    """(frames, 1, h, w) masks of ``frames`` in order."""
    if not frames:
        return torch.zeros(0)
    return torch.stack([masks[f] for f in frames])


def _attention_masks(maps: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Foreground masks from accumulated cross-attention maps: normalise, threshold, dilate."""
    out = {}
    for f, m in maps.items():
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-8)
        fg = (m >= MASK_THRESHOLD).float()[None, None]  # (1, 1, h, w)
        out[f] = F.max_pool2d(fg, 3, stride=1, padding=1)[0]  # (1, h, w)
    return out
