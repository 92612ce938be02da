"""Write diffusers SD 1.x, 2.x and SDXL components as ONE original-format checkpoint.

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
# SD 2.x's OpenCLIP-H and SDXL's two encoders (SGM's conditioner: CLIP-L, then OpenCLIP-bigG).
OPEN_CLIP_PREFIX = "cond_stage_model.model."
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
XL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

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
    # SDXL's embedding of the pooled text and size ids.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
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


# OpenCLIP's names for the parts of a transformers CLIP text layer.
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def open_clip_state_dict(text_encoder: Any) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder's weights under OpenCLIP's names (SD 2.x, SDXL's
    second encoder): q/k/v in one ``in_proj``, the projection transposed."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in state:
        out["text_projection"] = state.pop("text_projection.weight").T.contiguous()
    layers = int(text_encoder.config.num_hidden_layers)
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            qkv = [state.pop(f"{src}self_attn.{p}_proj.{param}") for p in ("q", "k", "v")]
            out[f"{dst}attn.in_proj_{param}"] = torch.cat(qkv)  # (3 * hidden, ...)
            for ours, theirs in _OPEN_CLIP_LAYER.items():
                out[f"{dst}{theirs}.{param}"] = state.pop(f"{src}{ours}.{param}")
    state.pop("embeddings.position_ids", None)
    if state:
        raise KeyError(f"no OpenCLIP name for {sorted(state)[:3]}")
    return out


def family_state_dict(
    unet: Any, vae: Any, text_encoder: Any, text_encoder_2: Any = None, open_clip: bool = False
) -> dict[str, torch.Tensor]:
    """One checkpoint's state dict: SD 1.x (``ldm_state_dict``), SD 2.x (``open_clip``: the
    text encoder under OpenCLIP names) or SDXL (a ``text_encoder_2``: SGM's conditioner)."""
    out = ldm_state_dict(unet, vae, text_encoder)
    if text_encoder_2 is None and not open_clip:
        return out
    out = {k: v for k, v in out.items() if not k.startswith(CLIP_PREFIX)}
    if text_encoder_2 is None:
        for key, value in open_clip_state_dict(text_encoder).items():
            out[OPEN_CLIP_PREFIX + key] = value
    else:
        for key, value in text_encoder.state_dict().items():
            out[XL_CLIP_PREFIX + clip_key_to_ldm(key)] = value
        for key, value in open_clip_state_dict(text_encoder_2).items():
            out[XL_OPEN_CLIP_PREFIX + key] = value
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def export_family_checkpoint(folder: str | Path, path: str | Path) -> Path:
    """Read the SD 2.x or SDXL diffusers folder ``folder`` and write it as one .safetensors
    file in its original layout (SD 2.x: a folder whose UNet projects linearly)."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder")
    text_encoder_2 = None
    if (folder / "text_encoder_2").is_dir():
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            str(folder), subfolder="text_encoder_2"
        )
    config = json.loads((folder / "unet" / "config.json").read_text())
    state = family_state_dict(
        unet, vae, text_encoder, text_encoder_2, open_clip=bool(config.get("use_linear_projection"))
    )
    path = Path(path)
    save_file(state, str(path))
    return path


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
