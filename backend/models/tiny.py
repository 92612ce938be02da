"""Built-in models: tiny random-weight ones built locally, and the trained shapes models.

``builtin:tiny`` (base), ``builtin:tiny-controlnet`` and ``builtin:tiny-pix2pix`` are
built here once, saved as diffusers folders with safetensors weights, and then loaded
through the same loading code as any user model. They produce noise-like images: they
exist so the whole chain runs offline on any machine in seconds, not to make pictures.

``builtin:shapes``, ``builtin:shapes-controlnet`` and ``builtin:shapes-pix2pix`` (SD 1.x in
miniature) and ``builtin:shapes-xl`` with ``builtin:shapes-xl-controlnet`` (SDXL in miniature)
are trained by ``tools/train_shapes.py`` on the synthetic world of ``backend/models/shapes.py``
and ship inside the package (``backend/models/builtin/``): they make pictures whose content the
prompt determines, so quality can be measured offline.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

BUILTIN_PREFIX = "builtin:"
TINY_KINDS = ("tiny", "tiny-controlnet", "tiny-pix2pix")
# The other families in miniature, shaped as diffusers' own tests build them: SDXL (two
# text encoders, pooled text and size conditions, several transformer layers per block)
# and SD 2.x (linear projections, an OpenCLIP-style tokenizer, v-prediction).
TINY_FAMILY_KINDS = (
    "tiny-xl",
    "tiny-xl-controlnet",
    "tiny-xl-union",
    "tiny-xl-pix2pix",
    "tiny-sd2",
)
ALL_TINY_KINDS = TINY_KINDS + TINY_FAMILY_KINDS
SHAPES_KINDS = (
    "shapes",
    "shapes-controlnet",
    "shapes-pix2pix",
    "shapes-xl",
    "shapes-xl-controlnet",
)
BUILTIN_KINDS = ALL_TINY_KINDS + SHAPES_KINDS
# The trained shapes models, committed with the package (see tools/train_shapes.py).
SHIPPED_DIR = Path(__file__).resolve().parent / "builtin"
# Bump when the tiny architecture changes so stale caches are rebuilt.
TINY_REVISION = 2
TINY_SEED = 1234
CROSS_DIM = 32


def cache_dir() -> Path:
    """Folder holding built-in models: $T2VZ_CACHE_DIR or ~/.cache/blender_t2vz."""
    root = os.environ.get("T2VZ_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "blender_t2vz"
    )
    return Path(root)


def _byte_vocab() -> list[str]:
    """The 256 byte-level characters CLIP's BPE tokenizer maps bytes to."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_tiny_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """A CLIP tokenizer with a byte-level vocabulary and no merges (one token per character).

    ``pad_token`` "!" makes it pad as OpenCLIP's tokenizers do (SD 2.x, SDXL's second).
    """
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_vocab()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp, "vocab.json")
        merges_file = Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(
            str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=77
        )
        tokenizer.save_pretrained(str(folder))


def _tiny_unet_config(in_channels: int) -> dict:
    """Two UNet levels, attention only in the lower-resolution one (fast on CPU)."""
    return dict(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _randomize_zero_convs(controlnet: torch.nn.Module) -> None:
    """Give a fresh ControlNet's zero convolutions random weights so control has an effect.

    The conditioning embedding's other convolutions get He-normal weights and zero biases:
    with PyTorch's default init its eight layers shrink the control image's signal about a
    thousandfold, and the embedding is then nearly the same for any control image.
    """
    gen = torch.Generator().manual_seed(TINY_SEED + 7)
    embedding = controlnet.controlnet_cond_embedding
    modules = [embedding.conv_out, controlnet.controlnet_mid_block]
    modules += list(controlnet.controlnet_down_blocks)
    with torch.no_grad():
        for conv in [embedding.conv_in, *embedding.blocks]:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            conv.bias.zero_()
        for module in modules:
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.3)
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.3)


def build_tiny(kind: str, folder: Path) -> Path:
    """Build the tiny model ``kind`` into ``folder`` (a diffusers folder, safetensors weights)."""
    from diffusers import (
        ControlNetModel,
        DDIMScheduler,
        StableDiffusionInstructPix2PixPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    if kind not in ALL_TINY_KINDS:
        raise ValueError(f"unknown tiny model {kind!r}; choose one of {', '.join(ALL_TINY_KINDS)}")
    torch.manual_seed(TINY_SEED)
    folder = Path(folder)
    if kind in TINY_FAMILY_KINDS:
        return _build_tiny_family(kind, folder)
    if kind == "tiny-controlnet":
        unet = UNet2DConditionModel(**_tiny_unet_config(4))
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=(8, 16, 16, 32)
        )
        _randomize_zero_convs(controlnet)
        controlnet.save_pretrained(str(folder), safe_serialization=True)
        return folder

    unet = UNet2DConditionModel(**_tiny_unet_config(8 if kind == "tiny-pix2pix" else 4))
    vae = _tiny_vae()
    tokenizer = _tiny_tokenizer()
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline_cls = (
        StableDiffusionInstructPix2PixPipeline
        if kind == "tiny-pix2pix"
        else StableDiffusionPipeline
    )
    return _save_sd_pipeline(
        pipeline_cls, folder, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        unet=unet, scheduler=scheduler,
    )  # fmt: skip


def _save_sd_pipeline(pipeline_cls: Any, folder: Path, **components: Any) -> Path:
    """Save an SD-layout pipeline of ``components`` (no safety checker) as safetensors."""
    pipeline = pipeline_cls(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _tiny_vae(**config: Any) -> Any:
    """A four-level VAE (8x downsampling, as SD's), a few thousand parameters."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        **config,
    )


def _tiny_tokenizer(pad_token: str = "<|endoftext|>") -> Any:
    """The tiny byte-level CLIP tokenizer, loaded."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(Path(tmp), pad_token)
        return CLIPTokenizer.from_pretrained(tmp)


def _tiny_text_config(tokenizer: Any, **config: Any) -> Any:
    """A two-layer CLIP text encoder config matching ``tokenizer``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        **{
            "vocab_size": len(tokenizer),
            "hidden_size": CROSS_DIM,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "projection_dim": CROSS_DIM,
            **config,
        }
    )


# SDXL's size conditions: six ids, each embedded in this many channels (SDXL: 256).
XL_TIME_EMBED_DIM = 8
# Width of the tiny SDXL's second text encoder: wider than the first, as OpenCLIP-bigG
# (1280) is than CLIP-L (768), so a single-file checkpoint's two encoders are told apart.
XL_TEXT_2_DIM = 48


def _tiny_xl_unet_config(in_channels: int) -> dict:
    """SDXL's UNet in miniature: linear projections, two transformer layers in the lower
    level, text of both encoders (32 + 48 channels), and the added embedding of six size ids
    plus the pooled text (``addition_embed_type`` "text_time")."""
    return dict(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=CROSS_DIM + XL_TEXT_2_DIM,
        addition_embed_type="text_time",
        addition_time_embed_dim=XL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * XL_TIME_EMBED_DIM + CROSS_DIM,
        norm_num_groups=8,
    )


def _build_tiny_family(kind: str, folder: Path) -> Path:
    """Build tiny-xl, tiny-xl-controlnet, tiny-xl-union, tiny-xl-pix2pix or tiny-sd2."""
    from diffusers import (
        ControlNetModel,
        ControlNetUnionModel,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLInstructPix2PixPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind == "tiny-sd2":
        # SD 2.x: linear projections, OpenCLIP-style padding ("!") and GELU, v-prediction.
        unet = UNet2DConditionModel(
            **{**_tiny_unet_config(4), "attention_head_dim": (2, 4), "use_linear_projection": True}
        )
        tokenizer = _tiny_tokenizer(pad_token="!")
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, hidden_act="gelu"))
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction",
        )
        return _save_sd_pipeline(
            StableDiffusionPipeline, folder, vae=_tiny_vae(), text_encoder=text_encoder,
            tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        )  # fmt: skip

    unet = UNet2DConditionModel(**_tiny_xl_unet_config(8 if kind == "tiny-xl-pix2pix" else 4))
    if kind in ("tiny-xl-controlnet", "tiny-xl-union"):
        # The union kind: one ControlNet for several kinds of control (ControlNetUnionModel).
        cls = ControlNetUnionModel if kind == "tiny-xl-union" else ControlNetModel
        controlnet = cls.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
        if kind == "tiny-xl-union":  # its condition transformer at the UNet's first width
            width = unet.config.block_out_channels[0]
            config = {k: v for k, v in controlnet.config.items() if k != "_use_default_values"}
            sized = cls.from_config(
                {**config, "num_trans_channel": width, "num_proj_channel": width}
            )
            shapes = {k: v.shape for k, v in sized.state_dict().items()}
            copied = {k: v for k, v in controlnet.state_dict().items() if shapes.get(k) == v.shape}
            sized.load_state_dict(copied, strict=False)
            controlnet = sized
        _randomize_zero_convs(controlnet)
        controlnet.save_pretrained(str(folder), safe_serialization=True)
        return folder
    tokenizer = _tiny_tokenizer()
    tokenizer_2 = _tiny_tokenizer(pad_token="!")
    # SDXL's VAE: latents scaled by 0.13025, float16 decoding upcast (it overflows there).
    vae = _tiny_vae(scaling_factor=0.13025, force_upcast=True)
    # SDXL ships Euler with "leading" spacing; the engine reads its betas into DDIM.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipeline_cls = (
        StableDiffusionXLInstructPix2PixPipeline
        if kind == "tiny-xl-pix2pix"
        else StableDiffusionXLPipeline
    )
    pipeline = pipeline_cls(
        vae=vae,
        text_encoder=CLIPTextModel(_tiny_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(
            _tiny_text_config(tokenizer_2, hidden_act="gelu", hidden_size=XL_TEXT_2_DIM)
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    return folder


def ensure_builtin(name: str) -> Path:
    """Folder of built-in model ``builtin:KIND``: shipped (shapes) or built once into the cache."""
    kind = name[len(BUILTIN_PREFIX) :] if name.startswith(BUILTIN_PREFIX) else name
    if kind not in BUILTIN_KINDS:
        raise ValueError(
            f"unknown built-in model {name!r}; choose one of "
            + ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_KINDS)
        )
    if kind in SHAPES_KINDS:
        folder = SHIPPED_DIR / kind
        if not folder.is_dir():
            raise ValueError(
                f"built-in model {name!r} is missing from this installation ({folder}); "
                "reinstall the extension or train it with python -m tools.train_shapes"
            )
        return folder
    target = cache_dir() / f"{kind}-r{TINY_REVISION}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=target.parent))
    try:
        build_tiny(kind, staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # another process won the race: use its copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
