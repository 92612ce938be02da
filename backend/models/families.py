"""Model families: the one place that knows how SD 1.x, SD 2.x and SDXL differ.

A family is a small record (``Family``) plus the few functions the engine and the loaders
call: detection from the model itself (a folder's configs, a single file's tensor names,
a loaded UNet's config; never from a name), text encoding, the UNet's added conditions,
and the VAE's quirks. The denoising loop calls these and never asks which family it runs.

* SD 1.x: one CLIP-L text encoder, its last hidden state; 512 px; epsilon prediction.
* SD 2.x: one OpenCLIP-H text encoder (the diffusers conversion keeps 23 of its 24 layers,
  so its last hidden state *is* OpenCLIP's penultimate layer, as Stability trained it);
  linear projections in the transformer blocks; 768 px v-prediction or 512 px epsilon,
  as the scheduler config says.
* SDXL (Podell et al. 2023, Sect. 2.1-2.2): CLIP-L and OpenCLIP-bigG, the penultimate hidden
  states of both concatenated (768 + 1280 = 2048 channels) plus the pooled, projected
  output of the second; size and crop conditions (original size, crop top-left, target
  size) embedded with the pooled text as ``added_cond_kwargs``; 1024 px; a VAE whose
  float16 decode overflows (``force_upcast``) and whose latents scale by 0.13025.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..protocol import (
    DEFAULT_MODEL,
    DEFAULT_PIX2PIX_MODEL,
    FAMILY_LABELS,
    FAMILY_SIDES,
    family_from_config,
    family_from_tensors,
    family_of_path,
    safetensors_shapes,
)

log = logging.getLogger(__name__)

# Stable Diffusion's noise schedule (SD 1.x, 2.x and SDXL alike): the DDIM configuration of
# a model that ships none (DDIMScheduler's own defaults, linear betas and clip_sample on,
# ruin the output). SD 2.x 768 px models ship prediction_type v_prediction in theirs.
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
}


# What a scheduler config saved for another sampler (SDXL ships Euler's, SD 1.5 PNDM's)
# leaves out and DDIM would otherwise take from its own class defaults (clip_sample and
# set_alpha_to_one on: clipped x0 and a wrong last step for every Stable Diffusion).
DDIM_DEFAULTS = {"clip_sample": False, "set_alpha_to_one": False}


def ddim_config(config: dict[str, Any]) -> dict[str, Any]:
    """The model's scheduler config with DDIM's Stable-Diffusion settings where it has none."""
    return {**DDIM_DEFAULTS, **config}


@dataclass(frozen=True)
class Family:
    """What sets a model family apart; the functions below act on it."""

    key: str  # written to job.json / run.json and shown by the add-on: sd1, sd2, sdxl
    label: str  # for people: "SD 1.x", "SD 2.x", "SDXL"
    native_side: int  # side of the square of its training pixel count (its usual size)
    # Hidden state of each text encoder that conditions the UNet: -1 the last, -2 the
    # penultimate (SDXL, Sect. 2.1: "the penultimate output layer").
    hidden_state: int
    # The second text encoder's pooled projection and the size/crop ids condition the UNet
    # through ``added_cond_kwargs`` (SDXL's micro-conditioning, Sect. 2.2).
    added_conditions: bool
    # An empty negative prompt becomes all-zero embeddings (diffusers' SDXL pipelines'
    # ``force_zeros_for_empty_prompt``, true in SDXL's model_index.json).
    zero_empty_negative: bool
    # The VAE decodes (and encodes) in float32 when its config says ``force_upcast`` and it
    # runs in float16 (SDXL's VAE overflows there); other families only retry after a NaN.
    honours_force_upcast: bool
    # Hub repos whose configs and tokenizers a single-file checkpoint of the family loads
    # with when the job names none (text-to-image, InstructPix2Pix; configs only).
    config_repo: str
    pix2pix_config_repo: str | None
    # The configs repo of the family's epsilon-prediction (512 px) model where config_repo is
    # a v-prediction one (SD 2.x: 2-1-base beside 2-1); None: config_repo serves both.
    epsilon_config_repo: str | None = None


def _family(key: str, **traits: Any) -> Family:
    """A family record with the protocol's label and native side for ``key``."""
    return Family(key=key, label=FAMILY_LABELS[key], native_side=FAMILY_SIDES[key], **traits)


SD1 = _family(
    "sd1",
    hidden_state=-1,
    added_conditions=False,
    zero_empty_negative=False,
    honours_force_upcast=False,
    config_repo=DEFAULT_MODEL,
    pix2pix_config_repo=DEFAULT_PIX2PIX_MODEL,
)
SD2 = _family(
    "sd2",
    hidden_state=-1,
    added_conditions=False,
    zero_empty_negative=False,
    honours_force_upcast=False,
    config_repo="stabilityai/stable-diffusion-2-1",
    pix2pix_config_repo=None,
    epsilon_config_repo="stabilityai/stable-diffusion-2-1-base",
)
SDXL = _family(
    "sdxl",
    hidden_state=-2,
    added_conditions=True,
    zero_empty_negative=True,
    honours_force_upcast=True,
    config_repo="stabilityai/stable-diffusion-xl-base-1.0",
    pix2pix_config_repo="diffusers/sdxl-instructpix2pix-768",
)
FAMILIES = {f.key: f for f in (SD1, SD2, SDXL)}


def single_file_config_repo(
    family: Family, pix2pix: bool = False, prediction_type: str | None = None
) -> str | None:
    """The hub repo whose configs and tokenizers a single-file checkpoint of ``family`` loads
    with when the job names none: the family's InstructPix2Pix repo, its epsilon (512 px)
    repo for an epsilon model where the default is v-prediction (SD 2.x), else its own."""
    if pix2pix:
        return family.pix2pix_config_repo
    if prediction_type == "epsilon" and family.epsilon_config_repo is not None:
        return family.epsilon_config_repo
    return family.config_repo


class FamilyError(ValueError):
    """A model of one family was combined with one of another, or none can be told."""


# --------------------------------------------------------------------------- detection


def family_from_unet_config(config: dict[str, Any]) -> Family:
    """The family of a UNet (or ControlNet) from its diffusers config
    (``protocol.family_from_config``: SDXL's "text_time" added embedding, SD 2.x's linear
    projections or 1024-wide text; tiny test models keep these markers at any width)."""
    return FAMILIES[family_from_config(config)]


def family_from_folder(folder: str | Path) -> Family | None:
    """The family of a diffusers folder (a pipeline's ``unet/config.json`` and
    ``text_encoder_2/``, a ControlNet's ``config.json``), or None if it has no configs."""
    key = family_of_path(folder) if Path(folder).is_dir() else None
    return None if key is None else FAMILIES[key]


def family_from_keys(shapes: dict[str, Sequence[int]]) -> Family | None:
    """The family of a checkpoint from its tensor names and shapes
    (``protocol.family_from_tensors``), or None when they do not tell."""
    key = family_from_tensors(shapes)
    return None if key is None else FAMILIES[key]


def family_from_file(path: str | Path) -> Family | None:
    """The family of a .safetensors checkpoint from its header (no tensor is read), or None
    for another format (a pickle is never opened just to look)."""
    if Path(path).suffix.lower() != ".safetensors":
        return None
    shapes = safetensors_shapes(path)
    return None if shapes is None else family_from_keys(shapes)


def family_of_location(kind: str, location: str) -> Family | None:
    """The family of a local model ("folder" or "file", as ``resolve_source`` says), read
    from its configs or tensor names without loading it; None when they do not tell."""
    if kind == "folder":
        return family_from_folder(location)
    if kind == "file":
        return family_from_file(location)
    return None


def check_same_family(base: Family, controlnet: Family, base_name: str, name: str) -> None:
    """Refuse a ControlNet of another family than the base model, naming both."""
    if base != controlnet:
        raise FamilyError(
            f"ControlNet {name!r} is an {controlnet.label} ControlNet, but the base model "
            f"{base_name!r} is {base.label}: use a ControlNet made for {base.label}"
        )


def check_model(base: Any, controlnets: Sequence[Any] = ()) -> None:
    """Refuse components that cannot run together, before any of them runs: a ControlNet of
    another family than the base, an SDXL UNet whose added embedding the text does not fit."""
    for i, controlnet in enumerate(controlnets):
        family = family_from_unet_config(dict(controlnet.config))
        check_same_family(base.family, family, base.source, f"controlnets[{i}]")
    if base.family.added_conditions:
        if base.text_encoder_2 is None:
            raise FamilyError(
                f"{base.source}: an {base.family.label} UNet needs its second text encoder "
                "(text_encoder_2 and tokenizer_2)"
            )
        check_added_conditions(base.unet, int(base.text_encoder_2.config.projection_dim))


def zeros_for_empty_negative(folder: str | Path | None, family: Family) -> bool:
    """``force_zeros_for_empty_prompt`` of a pipeline folder's model_index.json, or the
    family's default (true for SDXL, as diffusers' SDXL pipelines default to)."""
    if folder is not None:
        index = Path(folder) / "model_index.json"
        try:
            value = json.loads(index.read_text(encoding="utf-8")).get(
                "force_zeros_for_empty_prompt"
            )
        except (OSError, ValueError, AttributeError):
            value = None
        if isinstance(value, bool):
            return value and family.zero_empty_negative
    return family.zero_empty_negative


# --------------------------------------------------------------------------- text


@dataclass
class TextConditioning:
    """Encoded prompts, one row each: what the UNet's text inputs are built from."""

    embeds: torch.Tensor  # (prompts, 77, dim): cross-attention's keys and values
    pooled: torch.Tensor | None  # (prompts, pooled dim): SDXL's pooled text, else None
    own: torch.Tensor  # (prompts, 77) bool: each prompt's own tokens (no start/end/padding)

    def rows(self, index: Sequence[int]) -> TextConditioning:
        """The prompts at ``index``, in that order (guidance branches)."""
        pooled = None if self.pooled is None else self.pooled[list(index)]
        return TextConditioning(self.embeds[list(index)], pooled, self.own[list(index)])


def _token_ids(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """(prompts, 77) token ids, padded to the tokenizer's length and cut there."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def _own_tokens(tokenizer: Any, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(prompts, 77) bool: tokens that are not start, end or padding (an empty prompt keeps
    its end token, so its map is not empty)."""
    special = torch.tensor([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id])
    own = ~torch.isin(ids, special)
    limit = ids.shape[1]
    for row, length in zip(own, lengths, strict=True):
        if not row.any():
            row[min(length, limit) - 1] = True
    return own


def encode_text(
    base: Any, prompts: Sequence[str], negatives: Sequence[bool] = ()
) -> TextConditioning:
    """Encode ``prompts`` with every text encoder of ``base`` in one call each.

    ``negatives[i]`` marks prompt ``i`` as a negative prompt: an empty one becomes zeros
    where the model asks for it (``base.zero_empty_negative``, SDXL).
    """
    family = base.family
    prompts = list(prompts)
    encoders = [(base.tokenizer, base.text_encoder)]
    if base.text_encoder_2 is not None:
        encoders.append((base.tokenizer_2, base.text_encoder_2))
    hidden, pooled = [], None
    with torch.no_grad():
        for tokenizer, encoder in encoders:
            ids = _token_ids(tokenizer, prompts)  # (prompts, 77)
            out = encoder(ids.to(base.device), output_hidden_states=family.hidden_state != -1)
            if family.hidden_state == -1:
                hidden.append(out[0])  # last_hidden_state, final layer norm applied
            else:
                hidden.append(out.hidden_states[family.hidden_state])
            if family.added_conditions and out[0].ndim == 2:
                pooled = out[0]  # the projected pooled output (text_embeds), (prompts, dim)
        embeds = torch.cat(hidden, dim=-1).to(base.dtype)  # (prompts, 77, sum of widths)
        if family.added_conditions and pooled is None:
            raise ValueError(
                f"{base.source}: an {family.label} model needs a second text encoder with a "
                "projection (text_encoder_2, CLIPTextModelWithProjection)"
            )
        pooled = None if pooled is None else pooled.to(base.dtype)
        ids = _token_ids(base.tokenizer, prompts)
        lengths = [len(full) for full in base.tokenizer(prompts, truncation=False).input_ids]
        if max(lengths) > ids.shape[1]:
            log.warning("a prompt is longer than %d tokens; the rest is cut off", ids.shape[1])
        own = _own_tokens(base.tokenizer, ids, lengths)
        if getattr(base, "zero_empty_negative", False):
            for i, (prompt, negative) in enumerate(zip(prompts, negatives, strict=False)):
                if negative and prompt == "":
                    embeds[i] = 0
                    if pooled is not None:
                        pooled[i] = 0
    return TextConditioning(embeds, pooled, own)


# --------------------------------------------------------------------------- added conditions


def time_ids(height: int, width: int) -> list[int]:
    """SDXL's size and crop conditions (Sect. 2.2): original size, crop top-left, target size.

    The original size is the target size and the crop (0, 0): an uncropped picture of the
    size asked for, as diffusers' pipelines default to.
    """
    return [height, width, 0, 0, height, width]


def check_added_conditions(unet: Any, pooled_dim: int) -> None:
    """Refuse a UNet whose added embedding does not take six size ids plus the pooled text
    (an SDXL refiner takes an aesthetic score instead of the target size)."""
    expected = int(unet.config.addition_time_embed_dim) * 6 + pooled_dim
    found = int(unet.add_embedding.linear_1.in_features)
    if expected != found:
        raise ValueError(
            f"the UNet's added embedding takes {found} inputs, but six size/crop ids and the "
            f"{pooled_dim}-wide pooled text make {expected}: a refiner-style model "
            "(aesthetic score) is not supported"
        )


def added_conditions(
    text: TextConditioning, height: int, width: int, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor] | None:
    """``added_cond_kwargs`` for every prompt row of ``text`` (SDXL), or None.

    {"text_embeds": (rows, pooled dim), "time_ids": (rows, 6)}.
    """
    if text.pooled is None:
        return None
    ids = torch.tensor([time_ids(height, width)], dtype=dtype, device=device)
    return {"text_embeds": text.pooled, "time_ids": ids.expand(text.pooled.shape[0], -1)}


def repeat_conditions(
    added: dict[str, torch.Tensor] | None, frames: int
) -> dict[str, torch.Tensor] | None:
    """Each prompt row's added conditions for ``frames`` frames, branch-major, as the text."""
    if added is None:
        return None
    return {k: v.repeat_interleave(frames, dim=0) for k, v in added.items()}


# --------------------------------------------------------------------------- VAE


def vae_upcast(base: Any) -> bool:
    """True when the VAE must run in float32 although the model runs in float16 (SDXL's VAE
    with ``force_upcast``, unless a fixed VAE's config turns it off)."""
    vae = base.vae
    return (
        base.family.honours_force_upcast
        and vae.dtype == torch.float16
        and bool(getattr(vae.config, "force_upcast", False))
    )


def latents_for_vae(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Model latents to the VAE's latent space: / scaling_factor (0.18215 SD, 0.13025 SDXL),
    and the per-channel mean/std of VAEs whose config has them (some SDXL fine-tunes)."""
    config = vae.config
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std_t = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        return latents * std_t / config.scaling_factor + mean_t
    return latents / config.scaling_factor


def describe(family: Family) -> dict[str, Any]:
    """The family as job.json / run.json record it."""
    return {"family": family.key, "family_label": family.label}
