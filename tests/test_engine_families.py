"""backend/engine/pipeline.py on the other families: SDXL and SD 2.x against diffusers.

The tiny SDXL- and SD 2.x-shaped models (``backend.models.tiny``) load through the real
loader. With cross-frame attention and motion off and the same initial latents, every frame
is diffusers' own pipeline on that frame's inputs; with them on, text to video is
TextToVideoZeroSDXLPipeline wherever the two algorithms coincide (README, "Model families").
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from backend.engine.attention import CrossFrameAttnProcessor
from backend.engine.motion import ddpm_jump, frame_noise
from backend.engine.pipeline import Callbacks, ControlInput, TextToVideoZero
from backend.models.families import SD2, SDXL, FamilyError
from backend.models.loading import load_base_model, load_controlnet

SIZE, STEPS = 64, 4
LATENT = SIZE // 8


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float reordering (batching changes the last bits)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-2


def x_t(seed: int) -> torch.Tensor:
    return frame_noise(seed, 0, "x_T", (4, LATENT, LATENT))[None]


def random_image(seed: int) -> torch.Tensor:
    return torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def pipeline(cls: Any, base: Any, **extra: Any) -> Any:
    pipe = cls(**base.pipeline_components(), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain(engine: TextToVideoZero, frames: int = 1, **kwargs: Any) -> torch.Tensor:
    """Our loop with cross-frame attention and motion off: independent frames."""
    params = dict(
        prompt="a cat",
        num_frames=frames,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        seed=3,
        motion_dynamics=False,
        cross_frame_attention=False,
    )
    params.update(kwargs)
    return engine(**params)


@pytest.fixture(scope="module")
def xl(tiny_family_models: dict) -> Any:
    return load_base_model(str(tiny_family_models["tiny-xl"]))


@pytest.fixture(scope="module")
def xl_controlnet(tiny_family_models: dict) -> Any:
    return load_controlnet(str(tiny_family_models["tiny-xl-controlnet"]))


@pytest.fixture(scope="module")
def xl_pix2pix(tiny_family_models: dict) -> Any:
    return load_base_model(str(tiny_family_models["tiny-xl-pix2pix"]), pix2pix=True)


@pytest.fixture(scope="module")
def sd2(tiny_family_models: dict) -> Any:
    return load_base_model(str(tiny_family_models["tiny-sd2"]))


def test_the_tiny_models_load_as_their_families(xl: Any, xl_pix2pix: Any, sd2: Any) -> None:
    assert xl.family is SDXL and xl_pix2pix.family is SDXL and sd2.family is SD2
    assert xl.text_encoder_2 is not None and xl.tokenizer_2 is not None
    assert sd2.text_encoder_2 is None
    assert sd2.scheduler_config["prediction_type"] == "v_prediction"
    # Euler's saved config has no clip_sample: DDIM must not clip SDXL's x0.
    assert xl.scheduler_config["clip_sample"] is False


# --------------------------------------------------------------------------- SDXL


@pytest.mark.parametrize("negative", ["ugly", ""])
def test_every_frame_is_plain_sdxl(xl: Any, negative: str) -> None:
    """Text, pooled text and size ids, CFG and DDIM as StableDiffusionXLPipeline; an empty
    negative prompt is diffusers' default (None: zeros, force_zeros_for_empty_prompt)."""
    from diffusers import StableDiffusionXLPipeline

    ours = plain(TextToVideoZero(xl), frames=3, chunk_size=2, negative_prompt=negative)
    theirs = pipeline(StableDiffusionXLPipeline, xl)(
        "a cat",
        negative_prompt=negative or None,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        latents=x_t(3),
        output_type="latent",
    ).images
    for frame in ours:
        close(frame[None], theirs)


def test_sdxl_size_conditions_change_the_result(xl: Any) -> None:
    """The size ids reach the UNet: the same latents at another size id give another frame."""
    from diffusers import StableDiffusionXLPipeline

    ours = plain(TextToVideoZero(xl))
    other = pipeline(StableDiffusionXLPipeline, xl)(
        "a cat",
        negative_prompt=None,
        height=SIZE,
        width=SIZE,
        original_size=(2 * SIZE, 2 * SIZE),
        num_inference_steps=STEPS,
        latents=x_t(3),
        output_type="latent",
    ).images
    assert differ(ours, other)


def test_every_frame_is_plain_sdxl_controlnet(xl: Any, xl_controlnet: Any) -> None:
    """Each frame with its own control image is StableDiffusionXLControlNetPipeline on it."""
    from diffusers import StableDiffusionXLControlNetPipeline

    images = [random_image(s) for s in (5, 6, 7)]
    controls = [ControlInput(xl_controlnet, dict(enumerate(images)), weight=0.7)]
    ours = plain(TextToVideoZero(xl, [xl_controlnet]), frames=3, chunk_size=2, controls=controls)
    pipe = pipeline(StableDiffusionXLControlNetPipeline, xl, controlnet=xl_controlnet)
    for frame, image in zip(ours, images, strict=True):
        theirs = pipe(
            "a cat",
            image=image[None],
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            controlnet_conditioning_scale=0.7,
            guidance_scale=7.5,  # the pipeline's default is 5.0
            latents=x_t(3),
            output_type="latent",
        ).images
        close(frame[None], theirs)
    assert differ(ours[0], ours[1])  # the control images drive the frames


def test_several_sdxl_controlnets_sum_their_weighted_residuals(xl: Any, xl_controlnet: Any) -> None:
    from diffusers import StableDiffusionXLControlNetPipeline

    other = copy.deepcopy(xl_controlnet)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    images, weights = [random_image(5), random_image(6)], [0.7, 0.4]
    ours = plain(
        TextToVideoZero(xl, [xl_controlnet, other]),
        controls=[
            ControlInput(model, {0: image}, weight=weight)
            for model, image, weight in zip([xl_controlnet, other], images, weights, strict=True)
        ],
    )
    theirs = pipeline(StableDiffusionXLControlNetPipeline, xl, controlnet=[xl_controlnet, other])(
        "a cat",
        image=[image[None] for image in images],
        controlnet_conditioning_scale=weights,
        guidance_scale=7.5,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        latents=x_t(3),
        output_type="latent",
    ).images
    close(ours, theirs)


@pytest.fixture(scope="module")
def xl_union(tiny_family_models: dict) -> Any:
    return load_controlnet(str(tiny_family_models["tiny-xl-union"]))


def test_a_union_controlnet_loads_as_one(xl_union: Any) -> None:
    from diffusers import ControlNetUnionModel

    assert isinstance(xl_union, ControlNetUnionModel)


def test_every_frame_is_plain_sdxl_union_controlnet(xl: Any, xl_union: Any) -> None:
    """A union ControlNet with a control type: each frame is diffusers'
    StableDiffusionXLControlNetUnionPipeline on its own control image."""
    from diffusers import StableDiffusionXLControlNetUnionPipeline

    images = [random_image(s) for s in (5, 6)]
    controls = [ControlInput(xl_union, dict(enumerate(images)), weight=0.7, control_type=1)]
    ours = plain(TextToVideoZero(xl, [xl_union]), frames=2, chunk_size=2, controls=controls)
    pipe = pipeline(StableDiffusionXLControlNetUnionPipeline, xl, controlnet=xl_union)
    for frame, image in zip(ours, images, strict=True):
        theirs = pipe(
            "a cat",
            control_image=[image[None]],
            control_mode=[1],
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            controlnet_conditioning_scale=0.7,
            guidance_scale=7.5,
            latents=x_t(3),
            output_type="latent",
        ).images
        close(frame[None], theirs)
    other_type = [ControlInput(xl_union, dict(enumerate(images)), weight=0.7, control_type=3)]
    assert differ(plain(TextToVideoZero(xl, [xl_union]), controls=other_type), ours[:1])


def test_two_union_inputs_are_diffusers_multi_union(xl: Any, xl_union: Any) -> None:
    """Two control videos on one union model, each its type and weight: diffusers'
    MultiControlNetUnionModel with one type per entry (residuals summed)."""
    from diffusers import StableDiffusionXLControlNetUnionPipeline

    images, types, weights = [random_image(5), random_image(6)], [1, 3], [0.7, 0.4]
    controls = [
        ControlInput(xl_union, {0: image}, weight=w, control_type=k)
        for image, k, w in zip(images, types, weights, strict=True)
    ]
    ours = plain(TextToVideoZero(xl, [xl_union, xl_union]), controls=controls)
    pipe = pipeline(StableDiffusionXLControlNetUnionPipeline, xl, controlnet=[xl_union, xl_union])
    theirs = pipe(
        "a cat",
        control_image=[image[None] for image in images],  # one per union model
        control_mode=types,
        controlnet_conditioning_scale=weights,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        latents=x_t(3),
        output_type="latent",
    ).images
    close(ours, theirs)


def test_a_union_controlnet_video_does_not_depend_on_the_chunk_size(xl: Any, xl_union: Any) -> None:
    """Its condition transformer attends across the batch: called a frame at a time, a
    frame's result does not depend on which frames share its chunk."""
    images = {f: random_image(10 + f) for f in range(3)}
    engine = TextToVideoZero(xl, [xl_union])
    args = dict(prompt="a cat", num_frames=3, height=SIZE, width=SIZE, num_inference_steps=3,
                motion_dynamics=False)  # fmt: skip
    controls = [ControlInput(xl_union, images, weight=1.0, control_type=0)]
    close(engine(**args, chunk_size=1, controls=controls),
          engine(**args, chunk_size=3, controls=controls))  # fmt: skip
    with pytest.raises(ValueError, match="control_type must be one of 0..5, got None"):
        engine(**args, controls=[ControlInput(xl_union, images)])


@pytest.mark.parametrize(("text", "image_scale"), [(6.0, 1.7), (1.0, 1.7)])
def test_every_frame_is_plain_sdxl_instruct_pix2pix(
    xl_pix2pix: Any, text: float, image_scale: float
) -> None:
    """An 8-channel SDXL UNet: three guidance branches with pooled text, as
    StableDiffusionXLInstructPix2PixPipeline, each frame on its own source frame."""
    from diffusers import StableDiffusionXLInstructPix2PixPipeline

    images = [random_image(s) for s in (6, 8)]
    ours = plain(
        TextToVideoZero(xl_pix2pix),
        frames=2,
        prompt="make it snow",
        image=dict(enumerate(images)),
        guidance_scale=text,
        image_guidance_scale=image_scale,
    )
    pipe = pipeline(StableDiffusionXLInstructPix2PixPipeline, xl_pix2pix)
    for frame, image in zip(ours, images, strict=True):
        theirs = pipe(
            "make it snow",
            image=image[None],
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=text,
            image_guidance_scale=image_scale,
            latents=x_t(3),
            output_type="latent",
        ).images
        close(frame[None], theirs)


def test_cross_frame_attention_covers_every_sdxl_transformer_layer(xl: Any) -> None:
    """SDXL stacks several transformer layers per block: every attn1 gets the processor."""
    engine = TextToVideoZero(xl)
    seen: dict[str, type] = {}

    def spy(*args: Any, **kwargs: Any) -> None:
        seen.update({name: type(p) for name, p in xl.unet.attn_processors.items()})

    engine(
        "a cat",
        num_frames=2,
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        motion_dynamics=False,
        callbacks=Callbacks(progress=spy),
    )
    self_attention = [n for n in seen if n.endswith("attn1.processor")]
    assert any(".transformer_blocks.1.attn1" in n for n in self_attention)  # 2 layers a block
    assert all(seen[n] is CrossFrameAttnProcessor for n in self_attention)


def test_sdxl_text2video_is_chunk_invariant_and_follows_frame_one(xl: Any) -> None:
    engine = TextToVideoZero(xl)
    args = dict(
        prompt="a cat", num_frames=4, height=SIZE, width=SIZE, num_inference_steps=STEPS,
        seed=1, t0=1, t1=2,
    )  # fmt: skip
    whole = engine(**args, chunk_size=4)
    close(engine(**args, chunk_size=2), whole)
    close(engine(**args, frame_ids=[2]), whole[2:3])
    assert differ(whole[1], whole[2])


@pytest.mark.parametrize("motion", [0.0, 12.0, 40.0])
def test_sdxl_text2video_equals_diffusers_text_to_video_zero_sdxl(
    xl: Any, monkeypatch: pytest.MonkeyPatch, motion: float
) -> None:
    """Where the algorithms coincide, ours is TextToVideoZeroSDXLPipeline: frame 1's DDIM
    path T -> t1 -> t0, the warp (no motion, and shifts of 0.2 and 0.6 latent pixels a
    frame), cross-frame attention to frame 1 in every branch, the joint steps from t1. Two things differ by design and are aligned here: the noise of the
    t0 -> t1 jump (ours per (seed, frame), theirs from one generator) and its alpha product
    (theirs prod(alphas[t0:t1]), one timestep early; ours alphas_cumprod[t1] /
    alphas_cumprod[t0], DDPM's q(x_t1 | x_t0))."""
    from diffusers import DDIMScheduler, TextToVideoZeroSDXLPipeline

    frames, steps, t0, t1, seed = 3, 6, 1, 3, 2
    ours = TextToVideoZero(xl)(
        "a cat", negative_prompt="ugly", num_frames=frames, height=SIZE, width=SIZE,
        num_inference_steps=steps, seed=seed, t0=t0, t1=t1, motion=(motion, motion),
    )  # fmt: skip
    components = xl.pipeline_components()
    components.pop("force_zeros_for_empty_prompt")
    pipe = TextToVideoZeroSDXLPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    scheduler = DDIMScheduler.from_config(xl.scheduler_config)
    pipe.scheduler = scheduler
    latent = (4, LATENT, LATENT)

    def our_jump(x_t0: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, generator: Any) -> Any:
        eps = torch.stack([frame_noise(seed, f, "t0_to_t1", latent) for f in range(1, frames)])
        alphas = scheduler.alphas_cumprod
        return ddpm_jump(x_t0, float(alphas[int(t0)]), float(alphas[int(t1)]), eps)

    monkeypatch.setattr(pipe, "forward_loop", our_jump)
    theirs = pipe(
        "a cat",
        negative_prompt="ugly",
        video_length=frames,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        t0=t0,
        t1=t1,
        motion_field_strength_x=motion,
        motion_field_strength_y=motion,
        latents=x_t(seed),
        output_type="latent",
    ).images
    xl.unet.set_attn_processor(_default_processor())  # theirs leaves its own installed
    close(ours, theirs)


def _default_processor() -> Any:
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


def test_a_controlnet_of_another_family_is_refused_naming_both(
    xl: Any, tiny_controlnet: Any
) -> None:
    with pytest.raises(FamilyError, match=r"SD 1\.x ControlNet.*SDXL"):
        TextToVideoZero(xl, [tiny_controlnet])


def test_sdxl_vae_decodes_in_float32_under_force_upcast(xl: Any) -> None:
    """SDXL's VAE overflows in float16: with force_upcast it decodes in float32 and is float16
    again afterwards; a VAE whose config turns force_upcast off decodes in float16."""
    base = copy.copy(xl)
    base.vae = copy.deepcopy(xl.vae).half()
    decoded: list[torch.dtype] = []
    base.vae.decoder.register_forward_hook(lambda m, args, out: decoded.append(args[0].dtype))
    latents = x_t(4) * 5
    got = TextToVideoZero(base).decode(latents)
    assert decoded == [torch.float32] and base.vae.dtype == torch.float16
    reference = copy.copy(xl)
    reference.vae = copy.deepcopy(base.vae).float()  # the same float16-rounded weights
    assert torch.equal(got, TextToVideoZero(reference).decode(latents))
    base.vae.register_to_config(force_upcast=False)
    TextToVideoZero(base).decode(latents)
    assert decoded[-1] == torch.float16


# --------------------------------------------------------------------------- SD 2.x


def test_every_frame_is_plain_sd2_v_prediction(sd2: Any) -> None:
    """A v-prediction SD 2.x model (OpenCLIP-style tokenizer, linear projections) is
    StableDiffusionPipeline frame by frame."""
    from diffusers import StableDiffusionPipeline

    ours = plain(TextToVideoZero(sd2), frames=2, negative_prompt="ugly")
    theirs = pipeline(StableDiffusionPipeline, sd2)(
        "a cat",
        negative_prompt="ugly",
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        latents=x_t(3),
        output_type="latent",
    ).images
    for frame in ours:
        close(frame[None], theirs)
    # The same weights read as epsilon prediction give another frame: v is honoured.
    eps = copy.copy(sd2)
    eps.scheduler_config = {**sd2.scheduler_config, "prediction_type": "epsilon"}
    assert differ(plain(TextToVideoZero(eps)), ours[:1])


def test_cross_frame_attention_covers_the_sdxl_controlnets_layers(
    xl: Any, xl_controlnet: Any
) -> None:
    """The ControlNet's self-attention layers attend to frame 1 too, every one of them."""
    seen: dict[str, type] = {}

    def spy(*args: Any) -> None:
        seen.update({n: type(p) for n, p in xl_controlnet.attn_processors.items()})

    images = {f: random_image(20 + f) for f in range(2)}
    TextToVideoZero(xl, [xl_controlnet])(
        "a cat", num_frames=2, height=SIZE, width=SIZE, num_inference_steps=2,
        motion_dynamics=False, controls=[ControlInput(xl_controlnet, images)],
        callbacks=Callbacks(progress=spy),
    )  # fmt: skip
    self_attention = [n for n in seen if n.endswith("attn1.processor")]
    assert any(".transformer_blocks.1.attn1" in n for n in self_attention)
    assert all(seen[n] is CrossFrameAttnProcessor for n in self_attention)
    assert all(
        type(p) is not CrossFrameAttnProcessor for p in xl_controlnet.attn_processors.values()
    )
