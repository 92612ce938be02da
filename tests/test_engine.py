"""backend/engine/pipeline.py: the Text2Video-Zero loop on the tiny models (latents, not pixels)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import backend.engine.pipeline as engine_module
from backend.engine.motion import frame_noise, translate_latents
from backend.engine.pipeline import (
    Callbacks,
    Cancelled,
    ControlInput,
    TextToVideoZero,
    plan_generation,
)
from backend.protocol import resolve_t0_t1

FRAMES, SIZE, STEPS = 4, 64, 4
LATENT = SIZE // 8


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float reordering (latents here are O(10); batching changes the last bits)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-2


def run(engine: TextToVideoZero, **kwargs: Any) -> torch.Tensor:
    """A small text2video run with motion dynamics; ``kwargs`` override."""
    steps = kwargs.setdefault("num_inference_steps", STEPS)
    if kwargs.get("motion_dynamics", True) and "t0" not in kwargs:
        kwargs["t0"], kwargs["t1"] = resolve_t0_t1(steps)
    params = dict(prompt="a cat", num_frames=FRAMES, height=SIZE, width=SIZE, seed=0)
    params.update(kwargs)
    return engine(**params)


@pytest.fixture(scope="module")
def engine(tiny_base: Any) -> TextToVideoZero:
    return TextToVideoZero(tiny_base)


@pytest.fixture(scope="module")
def cn_engine(tiny_base: Any, tiny_controlnet: Any) -> TextToVideoZero:
    return TextToVideoZero(tiny_base, [tiny_controlnet])


@pytest.fixture(scope="module")
def reference(engine: TextToVideoZero) -> torch.Tensor:
    """The full 4-frame run every invariance is compared with."""
    return run(engine)


def control(image: torch.Tensor | list[torch.Tensor], model: Any, frames: int = FRAMES):
    images = image if isinstance(image, list) else [image] * frames
    return ControlInput(model, dict(enumerate(images)), weight=1.0)


def random_image(seed: int) -> torch.Tensor:
    return torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- basics


def test_latents_shape_and_dtype(engine: TextToVideoZero, reference: torch.Tensor) -> None:
    assert reference.shape == (FRAMES, 4, LATENT, LATENT)
    assert reference.dtype == torch.float32
    assert torch.isfinite(reference).all()
    wide = run(engine, num_frames=2, width=128, height=64, num_inference_steps=2)
    assert wide.shape == (2, 4, 8, 16)


def test_same_seed_same_latents_other_seed_other_latents(
    engine: TextToVideoZero, reference: torch.Tensor
) -> None:
    assert torch.equal(run(engine), reference)
    assert differ(run(engine, seed=1), reference)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, FRAMES])
def test_results_do_not_depend_on_the_chunk_size(
    engine: TextToVideoZero, reference: torch.Tensor, chunk_size: int
) -> None:
    close(run(engine, chunk_size=chunk_size), reference)


@pytest.mark.parametrize(("frame_ids", "chunk_size"), [([2, 3], 8), ([3], 8), ([1, 3], 1)])
def test_a_subset_of_frames_equals_those_frames_of_a_full_run(
    engine: TextToVideoZero, reference: torch.Tensor, frame_ids: list[int], chunk_size: int
) -> None:
    part = run(engine, frame_ids=frame_ids, chunk_size=chunk_size)
    assert part.shape[0] == len(frame_ids)
    close(part, reference[frame_ids])


def test_text2video_frames_differ_even_without_motion(engine: TextToVideoZero) -> None:
    """Frames 2..m get their own DDPM noise from t0 to t1 (design: not identical)."""
    lat = run(engine, motion=(0.0, 0.0))
    assert differ(lat[1], lat[2]) and differ(lat[2], lat[3])


def test_guidance_off_runs_one_branch(engine: TextToVideoZero, reference: torch.Tensor) -> None:
    no_cfg = run(engine, guidance_scale=1.0)
    assert no_cfg.shape == reference.shape and differ(no_cfg, reference)


def test_prompt_changes_the_result(engine: TextToVideoZero, reference: torch.Tensor) -> None:
    assert differ(run(engine, prompt="a dog"), reference)


def test_prompt_tokens_mask(engine: TextToVideoZero) -> None:
    embeds, own = engine.encode_prompts(["cat", ""])
    assert embeds.shape == (2, 77, 32)
    assert own.shape == (2, 77)
    assert own[0].sum() == 3  # one token per character in the tiny vocab
    assert own[1].sum() == 1  # an empty prompt falls back to the end token
    alone, _ = engine.encode_prompts(["cat"])
    torch.testing.assert_close(alone[0], embeds[0])  # batching does not change a prompt


# --------------------------------------------------------------------------- vs diffusers


def pipeline(cls: Any, base: Any, **extra: Any) -> Any:
    return cls(**base.pipeline_components(), **extra)


def x_t(seed: int) -> torch.Tensor:
    return frame_noise(seed, 0, "x_T", (4, LATENT, LATENT))[None]


def test_one_frame_is_plain_stable_diffusion(engine: TextToVideoZero, tiny_base: Any) -> None:
    """With one frame and no motion the loop is diffusers' own SD loop (CFG, DDIM, text)."""
    from diffusers import StableDiffusionPipeline

    ours = run(engine, num_frames=1, motion_dynamics=False, seed=3, negative_prompt="ugly")
    theirs = pipeline(StableDiffusionPipeline, tiny_base)(
        "a cat",
        negative_prompt="ugly",
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        latents=x_t(3),
        output_type="latent",
    ).images
    close(ours, theirs)


def test_frame_one_of_a_motion_run_is_plain_ddim(engine: TextToVideoZero, tiny_base: Any) -> None:
    """Frame 1 runs T -> t1 -> t0 alone, then rejoins at x_t1: its path is plain DDIM (Sect.
    3.3.1), identical to diffusers' SD loop, whatever the other frames do."""
    from diffusers import StableDiffusionPipeline

    steps, t0, t1 = 6, 1, 3  # frame 1 alone for steps 0-1 (T -> t1) and 2-3 (t1 -> t0)
    ours = run(
        engine,
        num_frames=3,
        seed=3,
        negative_prompt="ugly",
        num_inference_steps=steps,
        t0=t0,
        t1=t1,
    )
    theirs = pipeline(StableDiffusionPipeline, tiny_base)(
        "a cat",
        negative_prompt="ugly",
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=7.5,
        latents=x_t(3),
        output_type="latent",
    ).images
    close(ours[:1], theirs)


def test_one_frame_is_plain_controlnet(
    cn_engine: TextToVideoZero, tiny_base: Any, tiny_controlnet: Any
) -> None:
    from diffusers import StableDiffusionControlNetPipeline

    image = random_image(5)
    weighted = ControlInput(tiny_controlnet, {0: image}, weight=0.7)
    ours = run(cn_engine, num_frames=1, motion_dynamics=False, seed=3, controls=[weighted])
    theirs = pipeline(StableDiffusionControlNetPipeline, tiny_base, controlnet=tiny_controlnet)(
        "a cat",
        image=image[None],
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        controlnet_conditioning_scale=0.7,
        latents=x_t(3),
        output_type="latent",
    ).images
    close(ours, theirs)


def test_several_controlnets_sum_their_weighted_residuals(
    tiny_base: Any, tiny_controlnet: Any
) -> None:
    """Two different ControlNets with their own images and weights: diffusers' multi-ControlNet
    pipeline (residuals scaled by each weight and summed) gives the same frame."""
    import copy

    from diffusers import StableDiffusionControlNetPipeline

    other = copy.deepcopy(tiny_controlnet)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    images, weights = [random_image(5), random_image(6)], [0.7, 0.4]
    ours = run(
        TextToVideoZero(tiny_base, [tiny_controlnet, other]),
        num_frames=1,
        motion_dynamics=False,
        seed=3,
        controls=[
            ControlInput(model, {0: image}, weight=weight)
            for model, image, weight in zip([tiny_controlnet, other], images, weights, strict=True)
        ],
    )
    multi = pipeline(
        StableDiffusionControlNetPipeline, tiny_base, controlnet=[tiny_controlnet, other]
    )
    args = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=x_t(3))
    theirs = multi(
        "a cat",
        image=[image[None] for image in images],
        controlnet_conditioning_scale=weights,
        output_type="latent",
        **args,
    ).images
    close(ours, theirs)
    swapped = multi(
        "a cat",
        image=[image[None] for image in images],
        controlnet_conditioning_scale=weights[::-1],
        output_type="latent",
        **args,
    ).images
    assert differ(ours, swapped)  # each weight belongs to its own ControlNet


# Guidance scales around diffusers' switch: three guidance branches only when the text scale
# is above 1 and the image scale at least 1, one branch otherwise.
@pytest.mark.parametrize(("text", "image_scale"), [(6.0, 1.7), (1.0, 1.7), (6.0, 1.0)])
def test_one_frame_is_plain_instruct_pix2pix(
    tiny_pix2pix: Any, text: float, image_scale: float
) -> None:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    image = random_image(6)
    ours = run(
        TextToVideoZero(tiny_pix2pix),
        prompt="make it snow",
        num_frames=1,
        motion_dynamics=False,
        seed=3,
        image={0: image},
        guidance_scale=text,
        image_guidance_scale=image_scale,
    )
    theirs = pipeline(StableDiffusionInstructPix2PixPipeline, tiny_pix2pix)(
        "make it snow",
        image=image[None],
        num_inference_steps=STEPS,
        guidance_scale=text,
        image_guidance_scale=image_scale,
        latents=x_t(3),
        output_type="latent",
    ).images
    close(ours, theirs)


# --------------------------------------------------------------------------- motion dynamics


def test_motion_phase_warps_frame_k_by_k_times_the_shift(
    engine: TextToVideoZero, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Width 64 -> latent 8 wide; motion dx=64/512 per frame -> 1 latent pixel per frame."""
    warps: list[tuple[torch.Tensor, torch.Tensor]] = []
    jumps: list[tuple[torch.Tensor, float, float, torch.Tensor]] = []
    real_translate, real_jump = engine_module.translate_latents, engine_module.ddpm_jump

    def spy_translate(latents, shifts):
        warps.append((latents.clone(), shifts.clone()))
        return real_translate(latents, shifts)

    def spy_jump(x, a0, a1, noise):
        jumps.append((x.clone(), a0, a1, noise.clone()))
        return real_jump(x, a0, a1, noise)

    monkeypatch.setattr(engine_module, "translate_latents", spy_translate)
    monkeypatch.setattr(engine_module, "ddpm_jump", spy_jump)
    steps = 10
    t0, t1 = resolve_t0_t1(steps)
    run(engine, num_inference_steps=steps, motion=(64.0, 0.0), seed=5)

    assert len(warps) == 1  # one warp of x_t0^1, for frames 2..4
    source, shifts = warps[0]
    assert shifts.tolist() == [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]
    x_t0 = source[0]
    assert all(torch.equal(s, x_t0) for s in source)

    assert len(jumps) == 1  # one batched DDPM jump for frames 2..4
    x_warped, a0, a1, noise = jumps[0]
    assert x_warped.shape[0] == noise.shape[0] == FRAMES - 1
    scheduler = engine_module._ddim(engine.base.scheduler_config)
    scheduler.set_timesteps(steps)
    alphas, timesteps = scheduler.alphas_cumprod, scheduler.timesteps
    a_t0 = float(alphas[int(timesteps[steps - t0 - 1])])
    a_t1 = float(alphas[int(timesteps[steps - t1 - 1])])
    assert a_t1 < a_t0
    assert (a0, a1) == pytest.approx((a_t0, a_t1))
    for k, (x, eps) in enumerate(zip(x_warped, noise, strict=True), start=1):
        # Content moves k latent pixels left: out(x) = in(x + k).
        assert torch.equal(x[:, :, : LATENT - k], x_t0[:, :, k:])
        assert torch.equal(eps, frame_noise(5, k, "t0_to_t1", (4, LATENT, LATENT)))


def test_x_t1_has_no_odd_even_pattern(engine: TextToVideoZero) -> None:
    """16 frames at 128x128 with motion 16/512: 0.5 latent px per frame, a tie on odd frames
    for a warp sampling at exactly x + s. Measured (bench.warp_check helpers, seed 0, 10
    steps): old warp 0.26 mean lag-1 autocorrelation on odd frames vs 0.05 on even ones;
    ours 0.04 vs 0.05. The legacy warp is run too, so the test shows it can see the bug."""
    from bench.warp_check import lag1_autocorrelation, legacy_translate, x_t1_frames

    def odd_even_gap(warp: Any) -> float:
        x_t1 = x_t1_frames(engine, warp, 16, 128, 128, 10, 0, (16.0, 16.0))  # frames 2..16
        values = [lag1_autocorrelation(x) for x in x_t1]
        odd, even = values[0::2], values[1::2]  # frame index k = 1, 3, ... and 2, 4, ...
        return sum(odd) / len(odd) - sum(even) / len(even)

    assert odd_even_gap(legacy_translate) > 0.15
    assert abs(odd_even_gap(engine_module.translate_latents)) < 0.08


@pytest.mark.parametrize("steps", [2, 3, 7])
def test_motion_dynamics_run_for_small_step_counts(engine: TextToVideoZero, steps: int) -> None:
    reports: list[tuple[int, int, float]] = []
    lat = run(
        engine,
        num_frames=3,
        num_inference_steps=steps,
        callbacks=Callbacks(progress=lambda s, n, f: reports.append((s, n, f))),
    )
    assert lat.shape == (3, 4, LATENT, LATENT) and torch.isfinite(lat).all()
    assert reports[-1] == (steps, steps, 1.0)  # every planned evaluation ran, no more
    fractions = [f for _, _, f in reports]
    assert fractions == sorted(fractions)


@pytest.mark.parametrize("steps", range(2, 101))
def test_plans_for_any_step_count(steps: int) -> None:
    t0, t1 = resolve_t0_t1(steps)
    plan = plan_generation([3, 1, 5], 2, steps, True, t0, t1)
    assert plan.processed == [0, 1, 3, 5] and plan.frame_ids == [1, 3, 5]
    assert plan.chunks == [[0, 1], [3, 5]]
    assert plan.joint_start == steps - t1 - 1
    assert plan.evaluations == (t1 + 1) * 4 + (steps - t0 - 1)


def test_plan_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        plan_generation([0], 0, 10, False)
    with pytest.raises(ValueError, match="t0"):
        plan_generation([0], 2, 10, True, 5, 5)
    with pytest.raises(ValueError, match="t0"):
        plan_generation([0], 2, 10, True, 5, 10)


def test_bad_inputs_are_refused_before_any_model_runs(
    engine: TextToVideoZero, cn_engine: TextToVideoZero, tiny_controlnet: Any
) -> None:
    with pytest.raises(ValueError, match="divisible"):
        run(engine, width=60)
    with pytest.raises(ValueError, match="frame_ids"):
        run(engine, frame_ids=[4])
    with pytest.raises(ValueError, match="ControlNets"):
        run(cn_engine, motion_dynamics=False)
    partial = ControlInput(tiny_controlnet, {0: random_image(0), 1: random_image(1)})
    with pytest.raises(ValueError, match=r"frames \[2, 3\]"):
        run(cn_engine, motion_dynamics=False, controls=[partial])
    # A control paired with another ControlNet object than the engine's (a mix-up of
    # order with several ControlNets) is named, not run with the wrong model.
    stranger = ControlInput(copy.deepcopy(tiny_controlnet), partial.frames)
    with pytest.raises(ValueError, match=r"controls\[0\] is for another ControlNet"):
        run(cn_engine, motion_dynamics=False, controls=[stranger])
    with pytest.raises(ValueError, match="InstructPix2Pix"):
        run(engine, image={f: random_image(f) for f in range(FRAMES)})


# --------------------------------------------------------------------------- ControlNet


def test_one_control_image_for_every_frame_gives_identical_frames(
    cn_engine: TextToVideoZero, tiny_controlnet: Any
) -> None:
    lat = run(
        cn_engine, motion_dynamics=False, controls=[control(random_image(0), tiny_controlnet)]
    )
    for k in range(1, FRAMES):
        close(lat[k], lat[0])


def test_control_images_drive_the_frames(cn_engine: TextToVideoZero, tiny_controlnet: Any) -> None:
    images = [random_image(10 + k) for k in range(FRAMES)]
    lat = run(cn_engine, motion_dynamics=False, controls=[control(images, tiny_controlnet)])
    assert all(differ(lat[k], lat[0]) for k in range(1, FRAMES))
    same = run(cn_engine, motion_dynamics=False, controls=[control(images[0], tiny_controlnet)])
    close(lat[0], same[0])  # frame 1 sees the same control in both runs
    other = run(cn_engine, motion_dynamics=False, controls=[control(images[1], tiny_controlnet)])
    assert differ(other[0], same[0])


def test_every_frame_follows_the_anchor_frame(
    cn_engine: TextToVideoZero, tiny_controlnet: Any
) -> None:
    """Cross-frame attention in the run: frame 1's control changes frames 2..m too."""
    images = [random_image(50 + k) for k in range(3)]
    a = run(
        cn_engine, num_frames=3, motion_dynamics=False, controls=[control(images, tiny_controlnet)]
    )
    images[0] = random_image(99)
    b = run(
        cn_engine, num_frames=3, motion_dynamics=False, controls=[control(images, tiny_controlnet)]
    )
    assert all(differ(a[k], b[k]) for k in range(3))
    # ... but a later frame never changes an earlier one.
    images[2] = random_image(98)
    c = run(
        cn_engine, num_frames=3, motion_dynamics=False, controls=[control(images, tiny_controlnet)]
    )
    close(c[:2], b[:2])
    assert differ(c[2], b[2])


def test_without_cross_frame_attention_frames_ignore_the_anchor(
    cn_engine: TextToVideoZero, tiny_controlnet: Any
) -> None:
    """cross_frame_attention=False: each frame attends to itself, so frame 1's control no
    longer reaches frames 2..m, and a frame equals a run of that frame alone."""
    images = [random_image(50 + k) for k in range(3)]
    params = dict(num_frames=3, motion_dynamics=False, cross_frame_attention=False)
    a = run(cn_engine, controls=[control(images, tiny_controlnet)], **params)
    alone = run(cn_engine, controls=[control([images[2]] * 3, tiny_controlnet)], **params)
    close(a[2], alone[0])
    images[0] = random_image(99)
    b = run(cn_engine, controls=[control(images, tiny_controlnet)], **params)
    assert differ(a[0], b[0])
    close(a[1:], b[1:])
    attending = run(
        cn_engine, num_frames=3, motion_dynamics=False, controls=[control(images, tiny_controlnet)]
    )
    assert differ(attending[1:], b[1:])  # with it (the default), frame 1 steers them


def test_without_cross_frame_attention_the_model_keeps_its_processors(
    cn_engine: TextToVideoZero,
    tiny_base: Any,
    tiny_controlnet: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Self-attention keeps the model's own processors during the run; background smoothing
    still records its cross-attention maps; everything is restored afterwards."""
    before = processors_of(tiny_base.unet, tiny_controlnet)
    seen: list[dict[str, Any]] = []
    made: list[dict[int, torch.Tensor]] = []
    real_masks = engine_module._attention_masks

    def spy_masks(maps):
        seen.append(processors_of(tiny_base.unet, tiny_controlnet))
        made.append(real_masks(maps))
        return made[-1]

    monkeypatch.setattr(engine_module, "_attention_masks", spy_masks)
    run(
        cn_engine,
        controls=[control(random_image(0), tiny_controlnet)],
        smooth_bg=True,
        cross_frame_attention=False,
        **SMOOTH,
    )
    assert len(made) == 1 and sorted(made[0]) == list(range(FRAMES))
    for during, saved in zip(seen[0], before, strict=True):  # the UNet, the ControlNet
        self_attention = [name for name in during if name.endswith("attn1.processor")]
        assert self_attention and all(during[n] is saved[n] for n in self_attention)
    unet_during, unet_before = seen[0][0], before[0]
    assert any(unet_during[n] is not unet_before[n] for n in unet_during if "attn2" in n)
    assert_same_processors(before, tiny_base.unet, tiny_controlnet)


def test_controlnet_chunks_and_weights(cn_engine: TextToVideoZero, tiny_controlnet: Any) -> None:
    images = [random_image(20 + k) for k in range(FRAMES)]
    full = run(cn_engine, motion_dynamics=False, controls=[control(images, tiny_controlnet)])
    chunked = run(
        cn_engine,
        motion_dynamics=False,
        chunk_size=1,
        frame_ids=[2, 3],
        controls=[control(images, tiny_controlnet)],
    )
    close(chunked, full[2:])
    weak = ControlInput(tiny_controlnet, dict(enumerate(images)), weight=0.0)
    assert differ(run(cn_engine, motion_dynamics=False, controls=[weak]), full)


def test_uint8_images_are_read_as_their_float_values(
    cn_engine: TextToVideoZero, tiny_controlnet: Any, tiny_pix2pix: Any
) -> None:
    """Control and source frames may come as uint8 (how the runner keeps long videos)."""
    as_bytes = [(random_image(60 + k) * 255).round().to(torch.uint8) for k in range(FRAMES)]
    as_floats = [b.float() / 255 for b in as_bytes]
    kwargs = {"motion_dynamics": False}
    close(
        run(cn_engine, controls=[control(as_bytes, tiny_controlnet)], **kwargs),
        run(cn_engine, controls=[control(as_floats, tiny_controlnet)], **kwargs),
    )
    p2p = TextToVideoZero(tiny_pix2pix)
    close(
        run(p2p, image=dict(enumerate(as_bytes)), **kwargs),
        run(p2p, image=dict(enumerate(as_floats)), **kwargs),
    )


# --------------------------------------------------------------------------- Pix2Pix


def test_pix2pix_follows_its_source_frames(tiny_pix2pix: Any) -> None:
    p2p = TextToVideoZero(tiny_pix2pix)
    still = {f: random_image(30) for f in range(FRAMES)}
    lat = run(p2p, motion_dynamics=False, image=still, prompt="make it snow")
    assert lat.shape == (FRAMES, 4, LATENT, LATENT)
    for k in range(1, FRAMES):
        close(lat[k], lat[0])
    moving = {f: random_image(40 + f) for f in range(FRAMES)}
    lat2 = run(p2p, motion_dynamics=False, image=moving, prompt="make it snow")
    assert all(differ(lat2[k], lat2[0]) for k in range(1, FRAMES))
    close(run(p2p, motion_dynamics=False, image=moving, prompt="make it snow", chunk_size=1), lat2)
    with pytest.raises(ValueError, match="source video"):
        run(p2p, motion_dynamics=False)


def test_per_frame_initial_noise_is_each_frames_own_and_chunk_invariant(
    tiny_pix2pix: Any,
) -> None:
    p2p = TextToVideoZero(tiny_pix2pix)
    still = {f: random_image(30) for f in range(FRAMES)}
    kwargs = dict(motion_dynamics=False, image=still, prompt="make it snow")
    shared = run(p2p, **kwargs)
    own = run(p2p, initial_noise="per_frame", **kwargs)
    close(own[0], shared[0])  # frame 1 starts from the same x_T either way
    # A still source no longer gives identical frames: each frame has its own x_T.
    assert all(differ(own[k], own[0]) for k in range(1, FRAMES))
    close(run(p2p, initial_noise="per_frame", chunk_size=1, frame_ids=[2, 3], **kwargs), own[2:])
    with pytest.raises(ValueError, match="initial_noise must be one of shared, per_frame"):
        run(p2p, initial_noise="fresh", **kwargs)


# --------------------------------------------------------------------------- processors


def processors_of(*models: Any) -> list[dict]:
    return [dict(m.attn_processors) for m in models]


def assert_same_processors(before: list[dict], *models: Any) -> None:
    for saved, model in zip(before, models, strict=True):
        now = model.attn_processors
        assert now.keys() == saved.keys()
        assert all(now[name] is proc for name, proc in saved.items())


def test_processors_restored_after_a_run(
    cn_engine: TextToVideoZero, tiny_base: Any, tiny_controlnet: Any
) -> None:
    before = processors_of(tiny_base.unet, tiny_controlnet)
    run(
        cn_engine, controls=[control(random_image(0), tiny_controlnet)], num_frames=2, motion=(8, 8)
    )
    assert_same_processors(before, tiny_base.unet, tiny_controlnet)


def test_processors_restored_after_cancel(
    cn_engine: TextToVideoZero, tiny_base: Any, tiny_controlnet: Any
) -> None:
    before = processors_of(tiny_base.unet, tiny_controlnet)
    calls = []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        run(
            cn_engine,
            motion_dynamics=False,
            controls=[control(random_image(0), tiny_controlnet)],
            chunk_size=1,
            callbacks=Callbacks(should_cancel=should_cancel),
        )
    assert len(calls) == 4  # polled before every model call, stopped at once
    assert_same_processors(before, tiny_base.unet, tiny_controlnet)


def test_processors_restored_when_a_control_fails_mid_run(
    cn_engine: TextToVideoZero,
    tiny_base: Any,
    tiny_controlnet: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = processors_of(tiny_base.unet, tiny_controlnet)
    real_forward = tiny_controlnet.forward
    calls = []

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("control failed")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(tiny_controlnet, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="control failed"):
        run(cn_engine, motion_dynamics=False, controls=[control(random_image(0), tiny_controlnet)])
    assert_same_processors(before, tiny_base.unet, tiny_controlnet)


# --------------------------------------------------------------------------- smoothing


def masks(value: float) -> dict[int, torch.Tensor]:
    return {f: torch.full((1, SIZE, SIZE), value) for f in range(FRAMES)}


SMOOTH = dict(motion=(64.0, 0.0), num_inference_steps=6)


def distance_to_warped_anchor(lat: torch.Tensor) -> float:
    """How far frames 2..m are from frame 1 warped to them (1 latent pixel per frame)."""
    shifts = torch.tensor([[float(k), 0.0] for k in range(1, FRAMES)])
    warped = translate_latents(lat[:1].expand(FRAMES - 1, -1, -1, -1), shifts)
    return (lat[1:] - warped).norm().item()


@pytest.fixture(scope="module")
def unsmoothed(engine: TextToVideoZero) -> torch.Tensor:
    return run(engine, **SMOOTH)


def test_all_foreground_masks_change_nothing(
    engine: TextToVideoZero, unsmoothed: torch.Tensor
) -> None:
    close(run(engine, smooth_bg=True, masks=masks(1.0), **SMOOTH), unsmoothed)
    close(run(engine, smooth_bg=True, masks=masks(0.0), smooth_alpha=0.0, **SMOOTH), unsmoothed)


def test_background_is_pulled_toward_warped_frame_one(
    engine: TextToVideoZero, unsmoothed: torch.Tensor
) -> None:
    smoothed = run(engine, smooth_bg=True, masks=masks(0.0), smooth_alpha=0.9, **SMOOTH)
    close(smoothed[0], unsmoothed[0])  # frame 1 is the anchor, never blended
    assert distance_to_warped_anchor(smoothed) < 0.7 * distance_to_warped_anchor(unsmoothed)


def spy_on(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple]:
    """Record the arguments and result of ``engine_module.NAME`` on every call."""
    calls: list[tuple] = []
    real = getattr(engine_module, name)

    def spy(*args):
        out = real(*args)
        calls.append(tuple(a.clone() if torch.is_tensor(a) else a for a in args) + (out,))
        return out

    monkeypatch.setattr(engine_module, name, spy)
    return calls


def test_smoothing_blends_once_at_x_t1_keeping_frame_one_foreground_out(
    engine: TextToVideoZero, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sect. 3.3.3 as the official code does it: one blend of x_t1 with the background mask
    (1 - M^k)(1 - W_k(M^1)), then the joint phase runs from the blended latents."""
    blends = spy_on(monkeypatch, "smooth_background")
    jumps = spy_on(monkeypatch, "ddpm_jump")
    fg = masks(0.0)
    fg[0][:, :, : SIZE // 2] = 1.0  # frame 1: left half is foreground; frames 2..m: none
    run(engine, smooth_bg=True, masks=fg, smooth_alpha=0.6, **SMOOTH)
    assert len(blends) == 1 and len(jumps) == 1
    latents, warped, used_fg, alpha, _ = blends[0]
    assert alpha == 0.6
    torch.testing.assert_close(latents, jumps[0][-1])  # x_t1 of frames 2..m, fresh from the jump
    for k in range(1, FRAMES):  # motion 64/512 at latent width 8: k pixels to the left
        expected_fg = torch.zeros(1, LATENT, LATENT)
        expected_fg[:, :, : max(0, LATENT // 2 - k)] = 1.0  # W_k(M^1) (reflection adds none)
        assert torch.equal(used_fg[k - 1], expected_fg), f"frame {k + 1}"
        assert torch.equal(warped[k - 1][:, :, : LATENT - k], warped[0][:, :, k - 1 : LATENT - 1])


def _reflect(i: int, n: int) -> int:
    """Index i folded back into 0..n-1 by reflection about -0.5 and n - 0.5 (one fold)."""
    return -1 - i if i < 0 else 2 * n - 1 - i if i >= n else i


@pytest.mark.parametrize(("lat_h", "lat_w"), [(6, 10), (10, 6)])
def test_smoothing_on_non_square_latents_warps_frame_one_mask_along_x(
    engine: TextToVideoZero, monkeypatch: pytest.MonkeyPatch, lat_h: int, lat_w: int
) -> None:
    """h != w: frame 1's foreground (the top half of the first 4 columns) reaches frame k
    moved k latent pixels along x only, rows untouched; a swapped axis in the motion shift,
    the mask resize or the warp moves it otherwise or fails to broadcast. The region covers
    unequal fractions of height and width (1/2, 4/w): a transposed mask resized back to
    h x w would not map onto itself, as a quarter of the frame does.

    Motion 512 / lat_w (in 1/512 of the frame per frame) is one latent pixel per frame
    along x, so the expectation is whole-pixel indexing by hand.
    """
    blends = spy_on(monkeypatch, "smooth_background")
    height, width = 8 * lat_h, 8 * lat_w
    fg = {f: torch.zeros(1, height, width) for f in range(FRAMES)}
    fg[0][:, : 8 * (lat_h // 2), : 8 * 4] = 1.0  # frame 1, in pixels
    params = dict(height=height, width=width, motion=(512.0 / lat_w, 0.0), num_inference_steps=6)
    run(engine, smooth_bg=True, masks=fg, smooth_alpha=0.6, **params)
    assert len(blends) == 1
    latents, warped, used_fg, _alpha, _ = blends[0]
    assert latents.shape == (FRAMES - 1, 4, lat_h, lat_w)
    for k in range(1, FRAMES):
        expected = torch.zeros(1, lat_h, lat_w)
        for y in range(lat_h // 2):
            for x in range(lat_w):
                expected[0, y, x] = float(_reflect(x + k, lat_w) < 4)
        assert torch.equal(used_fg[k - 1], expected), f"frame {k + 1}"
        # Frame 1's latents, warped: frame k is frame 2's warp moved k - 1 further along x.
        inside = lat_w - k
        assert torch.equal(warped[k - 1][..., :inside], warped[0][..., k - 1 : k - 1 + inside])


def test_smoothing_with_attention_masks_runs_a_mask_pass_then_starts_again_from_x_t1(
    engine: TextToVideoZero, unsmoothed: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    blends = spy_on(monkeypatch, "smooth_background")
    jumps = spy_on(monkeypatch, "ddpm_jump")
    reports: list[float] = []
    smoothed = run(
        engine,
        smooth_bg=True,
        callbacks=Callbacks(progress=lambda s, n, f: reports.append(f)),
        **SMOOTH,
    )
    assert len(blends) == 1
    torch.testing.assert_close(blends[0][0], jumps[0][-1])  # the blend starts from x_t1
    assert reports == sorted(reports) and reports[-1] == pytest.approx(1.0)  # mask pass counted
    close(smoothed[0], unsmoothed[0])  # frame 1 is never blended and attends only to itself
    assert differ(smoothed, unsmoothed)


def test_every_step_smoothing_stays_selectable(
    engine: TextToVideoZero, unsmoothed: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    blends = spy_on(monkeypatch, "smooth_background")
    kwargs = dict(smooth_bg=True, masks=masks(0.0), smooth_alpha=0.9, **SMOOTH)
    every = run(engine, smooth_schedule="every_step", **kwargs)
    joint_steps = SMOOTH["num_inference_steps"] - (
        SMOOTH["num_inference_steps"] - resolve_t0_t1(SMOOTH["num_inference_steps"])[1] - 1
    )
    assert len(blends) == joint_steps - 1  # after every joint step but the last
    once = run(engine, smooth_schedule="once", **kwargs)
    assert differ(every, once)
    # every_step pulls the finished frames harder toward frame 1 than one blend at x_t1.
    assert distance_to_warped_anchor(every) < distance_to_warped_anchor(once)


def test_every_step_smoothing_with_attention_masks_blends_from_the_recorded_steps_on(
    engine: TextToVideoZero, unsmoothed: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without user masks the every-step variant records the prompt's cross-attention over
    the first 20 % of the joint steps, then blends after each later step but the last: at
    steps record_until .. steps - 1, frames 2..m only, frame 1 untouched."""
    blends = spy_on(monkeypatch, "smooth_background")
    steps = SMOOTH["num_inference_steps"]
    joint_start = steps - resolve_t0_t1(steps)[1] - 1
    record_until = joint_start + max(1, round((steps - joint_start) * 0.2))
    every = run(engine, smooth_bg=True, smooth_schedule="every_step", **SMOOTH)
    assert len(blends) == steps - record_until
    assert all(call[0].shape[0] == FRAMES - 1 for call in blends)  # frames 2..m
    assert all(call[2].shape == (FRAMES - 1, 1, 8, 8) for call in blends)  # their masks
    close(every[0], unsmoothed[0])
    assert differ(every, unsmoothed)


def test_anchor_previews_get_frame_1_after_every_joint_step(engine: TextToVideoZero) -> None:
    """callbacks.anchor_preview: (step, frame 1's predicted clean latent (1, 4, h, w)) after
    each joint step."""
    seen: list[tuple[int, tuple]] = []
    callbacks = Callbacks(anchor_preview=lambda step, x0: seen.append((step, tuple(x0.shape))))
    run(engine, callbacks=callbacks, chunk_size=2)
    joint_start = STEPS - resolve_t0_t1(STEPS)[1] - 1
    assert seen == [(i + 1, (1, 4, 8, 8)) for i in range(joint_start, STEPS)]


def test_smoothing_refuses_pix2pix_and_unknown_schedules(
    engine: TextToVideoZero, tiny_pix2pix: Any
) -> None:
    source = {f: random_image(50 + f) for f in range(FRAMES)}
    with pytest.raises(ValueError, match="smooth_bg is for text2video and ControlNet"):
        run(TextToVideoZero(tiny_pix2pix), motion_dynamics=False, image=source, smooth_bg=True)
    with pytest.raises(ValueError, match="smooth_schedule must be one of once, every_step"):
        run(engine, smooth_bg=True, smooth_schedule="sometimes")


def test_cross_attention_masks(
    engine: TextToVideoZero, unsmoothed: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[dict[int, torch.Tensor]] = []
    real = engine_module._attention_masks

    def spy(maps):
        out = real(maps)
        made.append(out)
        return out

    monkeypatch.setattr(engine_module, "_attention_masks", spy)
    smoothed = run(engine, smooth_bg=True, **SMOOTH)
    assert len(made) == 1
    fg = made[0]
    assert sorted(fg) == list(range(FRAMES))
    for m in fg.values():
        assert m.shape == (1, LATENT, LATENT)
        assert ((m == 0) | (m == 1)).all()  # within [0, 1]: hard foreground/background
    assert torch.isfinite(smoothed).all()
    assert any((m == 0).any() for m in fg.values()), "the tiny model should find background"
    assert differ(smoothed, unsmoothed)
    # The masks of a frame come from that frame alone: chunking does not change them.
    close(run(engine, smooth_bg=True, chunk_size=1, **SMOOTH), smoothed)


def test_cross_attention_masks_come_from_the_prompt_branch(
    engine: TextToVideoZero, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The smoothing masks read the prompt's branch, never the negative prompt's: in the first
    cross-attention layer of the first UNet call the prompt's rows depend only on x_T and the
    prompt, so a different negative prompt must leave the first recorded maps unchanged."""
    from backend.engine.attention import CrossAttnMapRecorder

    real_add = CrossAttnMapRecorder.add
    first: list[dict[int, torch.Tensor]] = []

    def spy(self, probs, branches):
        real_add(self, probs, branches)
        if not first:
            first.append({f: m.clone() for f, m in self.maps.items()})

    monkeypatch.setattr(CrossAttnMapRecorder, "add", spy)

    def first_maps(prompt: str, negative: str) -> dict[int, torch.Tensor]:
        first.clear()
        run(
            engine,
            prompt=prompt,
            negative_prompt=negative,
            smooth_bg=True,
            motion_dynamics=False,  # the first UNet call sees x_T, not a guided motion phase
            num_inference_steps=6,
        )
        return first[0]

    def gap(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> float:
        return max((a[f] - b[f]).abs().max().item() for f in a)

    reference = first_maps("a cat", "")
    other_negative = gap(first_maps("a cat", "a dog in the rain"), reference)
    other_prompt = gap(first_maps("a dog in the rain", ""), reference)
    # Measured: 0.0 for another negative prompt, 8.7e-4 for another prompt.
    assert other_negative < 0.05 * other_prompt


# --------------------------------------------------------------------------- decoding


def test_decode_gives_rgb8_frames(engine: TextToVideoZero, reference: torch.Tensor) -> None:
    images = engine.decode(reference[:2])
    assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == torch.uint8


def test_decode_matches_diffusers_decoding(engine: TextToVideoZero, tiny_base: Any) -> None:
    """Our decode is diffusers' SD pipeline's own decode (latents / scaling factor, VAE,
    [-1, 1] -> 8 bit): the same pipeline run gives its latents and its images."""
    from diffusers import StableDiffusionPipeline

    pipe = pipeline(StableDiffusionPipeline, tiny_base)
    args = dict(height=SIZE, width=SIZE, num_inference_steps=2, latents=x_t(5))
    lat = pipe("a cat", output_type="latent", **args).images
    theirs = pipe("a cat", output_type="np", **args).images  # (1, H, W, 3) floats in [0, 1]
    ours = engine.decode(lat).numpy().astype(int)
    expected = (theirs * 255).round().astype(int)
    assert abs(ours - expected).max() <= 1  # rounding of the last bit only
    assert expected.std() > 10  # not saturated: a decode without the scaling factor differs


# --------------------------------------------------------------------------- fp16 decode


def overflowing_vae(tiny_base: Any) -> torch.nn.Module:
    """The tiny VAE with its decoder input scaled 1e5: fine in float32 (GroupNorm follows),
    inf/NaN in float16 (above 65504), like SD 1.5's VAE on some latents."""
    import copy

    vae = copy.deepcopy(tiny_base.vae)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
        vae.decoder.conv_in.bias.mul_(1e5)
    return vae


def test_float16_vae_decodes_in_float32_on_overflow_only(
    tiny_base: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An overflowing float16 decode is redone in float32; a finite one is kept, whatever
    the config's ``force_upcast`` says (diffusers' SD 1.x pipelines ignore it too)."""
    import copy
    from dataclasses import replace

    latents = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(3))
    vae32 = overflowing_vae(tiny_base)
    vae16 = copy.deepcopy(vae32).half()
    scaled = latents / vae16.config.scaling_factor
    with torch.no_grad():  # the overflow is real: a plain float16 decode is not finite
        assert not torch.isfinite(vae16.decode(scaled.half()).sample).all()
    vae16.register_to_config(force_upcast=False)
    expected = TextToVideoZero(replace(tiny_base, vae=vae32)).decode(latents)
    engine16 = TextToVideoZero(replace(tiny_base, vae=vae16, dtype=torch.float16))
    with caplog.at_level("WARNING", logger="backend.engine.pipeline"):
        frames = engine16.decode(latents)
    assert any("overflowed in float16" in r.getMessage() for r in caplog.records)
    assert vae16.dtype == torch.float16  # upcast only for the call
    # float16-rounded weights decoded in float32: within a few 8-bit levels of float32's.
    assert (frames.int() - expected.int()).abs().max() <= 3

    dtypes: list[torch.dtype] = []
    real_decode = vae16.decode

    def spy(x, *args, **kwargs):
        dtypes.append(x.dtype)
        return real_decode(x, *args, **kwargs)

    vae16.decode = spy
    caplog.clear()
    assert torch.equal(engine16.decode(latents), frames)
    assert dtypes == [torch.float16, torch.float32]  # the float16 attempt, then the redo

    # A VAE that does not overflow decodes once, in float16, even with force_upcast set.
    fine16 = copy.deepcopy(tiny_base.vae).half()
    fine16.register_to_config(force_upcast=True)
    dtypes.clear()
    real_fine = fine16.decode
    fine16.decode = lambda x, *a, **k: (dtypes.append(x.dtype), real_fine(x, *a, **k))[1]
    caplog.clear()
    got = TextToVideoZero(replace(tiny_base, vae=fine16, dtype=torch.float16)).decode(latents)
    assert dtypes == [torch.float16] and not caplog.records
    want = TextToVideoZero(tiny_base).decode(latents)
    assert (got.int() - want.int()).abs().max() <= 3  # float16 rounding: a few 8-bit levels


def test_a_bfloat16_model_runs_in_bfloat16(tiny_models: dict, engine: TextToVideoZero) -> None:
    """The engine follows its model's dtype: every UNet call gets bf16 latents (a float32
    latent into bf16 weights is an error), and the result is the float32 run's within
    bf16's precision."""
    from backend.models.loading import load_base_model

    base16 = load_base_model(str(tiny_models["tiny"]), dtype=torch.bfloat16)
    seen: list[torch.dtype] = []
    hook = base16.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    try:
        got = run(TextToVideoZero(base16), num_frames=2)
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    want = run(engine, num_frames=2)
    assert got.dtype == torch.float32  # returned as float32 whatever the model's dtype
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_decode_maps_the_vae_range_to_8_bit_by_hand(tiny_base: Any) -> None:
    """VAE output v in [-1, 1] -> round((v + 1) * 127.5), clamped to [0, 255]; latents are
    divided by the VAE's scaling factor first. A stand-in VAE returns chosen values."""
    from dataclasses import replace
    from types import SimpleNamespace

    values = torch.tensor([-1.3, -1.0, -0.5, 0.0, 0.5, 0.999, 1.0, 1.2])
    received: list[torch.Tensor] = []

    class VAE:
        config = SimpleNamespace(scaling_factor=0.5, force_upcast=False)
        dtype = torch.float32

        def decode(self, x: torch.Tensor, return_dict: bool = True) -> tuple[torch.Tensor]:
            received.append(x)
            return (values.view(1, 1, 1, -1).expand(1, 3, 1, -1),)  # (1, 3, 1, 8)

    out = TextToVideoZero(replace(tiny_base, vae=VAE())).decode(torch.ones(1, 4, 1, 1))
    assert torch.equal(received[0], torch.full((1, 4, 1, 1), 2.0))  # 1 / 0.5
    assert out.dtype == torch.uint8 and out.shape == (1, 1, 8, 3)
    # (v + 1) * 127.5: -38.25, 0, 63.75, 127.5, 191.25, 254.87, 255, 280.5 -> round, clamp
    assert out[0, 0, :, 0].tolist() == [0, 0, 64, 128, 191, 255, 255, 255]
