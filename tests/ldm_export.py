"""Write diffusers SD 1.x components as ONE original-format (LDM / CompVis) checkpoint.

The inverse of diffusers' single-file conversion (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``): key names as in the
checkpoints users download (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*``). General over block counts and layers per block, so
it works for the tiny test models as well as full-size SD 1.x. Used by the tests to prove
that ``backend.models.loading`` really loads single-file checkpoints.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# Parts of a ResNet block: diffusers name -> LDM (openaimodel ResBlock) name.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# VAE mid-block attention: diffusers Attention -> LDM AttnBlock (1x1 convs).
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
}


def _split_param(key: str) -> tuple[str, str]:
    """("a.b.c", "weight") for "a.b.c.weight"."""
    module, _, param = key.rpartition(".")
    return module, param


def unet_key_to_ldm(key: str, layers_per_block: int, attention_up_blocks: set[int]) -> str:
    """LDM name (without prefix) of a diffusers UNet2DConditionModel state-dict key."""
    per_block = layers_per_block + 1  # LDM entries per level: the layers, then a resampler
    module, param = _split_param(key)
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{param}"

    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * per_block + layer
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_resnet_rest(rest)}"
        return f"input_blocks.{index}.1.{rest}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key)
    if m:
        index = 1 + int(m[1]) * per_block + layers_per_block
        return f"input_blocks.{index}.0.op.{m[2]}"

    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, layer, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"middle_block.{2 * layer}.{_resnet_rest(rest)}"
        return f"middle_block.{2 * layer + 1}.{rest}"

    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_block + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_resnet_rest(rest)}"
        return f"output_blocks.{index}.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key)
    if m:
        block = int(m[1])
        index = block * per_block + layers_per_block
        # The upsampler follows the layer's attention when the level has one.
        slot = 2 if block in attention_up_blocks else 1
        return f"output_blocks.{index}.{slot}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key!r}")


def _resnet_rest(rest: str) -> str:
    module, param = _split_param(rest)
    if module not in _UNET_RESNET:
        raise KeyError(f"unknown ResNet part {rest!r}")
    return f"{_UNET_RESNET[module]}.{param}"


def vae_key_to_ldm(key: str, num_up_blocks: int) -> str:
    """LDM name (without prefix) of a diffusers AutoencoderKL state-dict key."""
    module, param = _split_param(key)
    if module in _VAE_TOP:
        return f"{_VAE_TOP[module]}.{param}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        level = num_up_blocks - 1 - int(m[1])  # LDM counts decoder levels from the bottom
        return f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key)
    if m:
        level = num_up_blocks - 1 - int(m[1])
        return f"decoder.up.{level}.upsample.conv.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key)
    if m:
        rest = m[3].replace("conv_shortcut", "nin_shortcut")
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{rest}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(\w+)", key)
    if m:
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.\w+|(post_)?quant_conv\.\w+", key):
        return key
    raise KeyError(f"no LDM name for VAE key {key!r}")


def clip_key_to_ldm(key: str) -> str:
    """LDM name (without prefix) of a CLIPTextModel key (transformers 5 drops ``text_model.``)."""
    return key if key.startswith("text_model.") else f"text_model.{key}"


def ldm_state_dict(unet: Any, vae: Any, text_encoder: Any) -> dict[str, torch.Tensor]:
    """The original-format state dict of one SD 1.x checkpoint."""
    out: dict[str, torch.Tensor] = {}
    layers = int(unet.config.layers_per_block)
    attention_up = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    for key, value in unet.state_dict().items():
        out[UNET_PREFIX + unet_key_to_ldm(key, layers, attention_up)] = value
    num_up = len(vae.config.up_block_types)
    for key, value in vae.state_dict().items():
        ldm = vae_key_to_ldm(key, num_up)
        if ".mid.attn_1." in ldm and ldm.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out[VAE_PREFIX + ldm] = value
    for key, value in text_encoder.state_dict().items():
        out[CLIP_PREFIX + clip_key_to_ldm(key)] = value
    if len(out) != len(unet.state_dict()) + len(vae.state_dict()) + len(text_encoder.state_dict()):
        raise ValueError("two diffusers keys mapped to the same LDM key")
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def export_ldm_checkpoint(folder: str | Path, path: str | Path) -> Path:
    """Read the diffusers folder ``folder`` and write it as a single .safetensors file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    folder = str(folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    path = Path(path)
    save_file(ldm_state_dict(unet, vae, text_encoder), str(path))
    return path
