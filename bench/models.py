"""Models for the benchmarks: the builtin tiny set, or SD 1.5's architecture with random weights.

The SD 1.5 configs are in bench/configs/sd15 (the real values of the released model; no
download). Its tokenizer is the tiny byte-level one; the text encoder's vocabulary covers
it. The ControlNet is ``ControlNetModel.from_unet`` of the UNet, the Pix2Pix UNet the same
architecture with 8 input channels. Tiny models go through the same loading code as users'
models (saved, then ``load_base_model`` / ``load_controlnet``).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from backend.models.loading import BaseModel, _place, load_base_model, load_controlnet
from backend.models.tiny import _randomize_zero_convs, build_tiny, write_tiny_tokenizer

CONFIGS = Path(__file__).resolve().parent / "configs"
MODEL_KINDS = ("tiny", "sd15")


@dataclass
class BenchModels:
    """Base model, plus the ControlNet and the Pix2Pix base model when a mode needs them."""

    base: BaseModel
    controlnet: Any = None
    pix2pix: BaseModel | None = None
    folders: dict[str, Path] = field(default_factory=dict)  # saved copies (tiny only)


def build_models(
    kind: str, modes: list[str], device: torch.device, dtype: torch.dtype, workdir: Path
) -> BenchModels:
    """The models ``modes`` need, on ``device`` in ``dtype``."""
    if kind == "tiny":
        return _tiny_models(modes, device, dtype, workdir)
    if kind == "sd15":
        return _sd15_models(modes, device, dtype)
    raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(MODEL_KINDS)}")


def _tiny_models(
    modes: list[str], device: torch.device, dtype: torch.dtype, workdir: Path
) -> BenchModels:
    folders = {"base": build_tiny("tiny", workdir / "tiny")}
    models = BenchModels(load_base_model(str(folders["base"]), device=device, dtype=dtype))
    if "controlnet" in modes:
        folders["controlnet"] = build_tiny("tiny-controlnet", workdir / "tiny-controlnet")
        models.controlnet = load_controlnet(str(folders["controlnet"]), device=device, dtype=dtype)
    if "pix2pix" in modes:
        folders["pix2pix"] = build_tiny("tiny-pix2pix", workdir / "tiny-pix2pix")
        models.pix2pix = load_base_model(
            str(folders["pix2pix"]), pix2pix=True, device=device, dtype=dtype
        )
    models.folders = folders
    return models


def _config(name: str) -> dict:
    return json.loads((CONFIGS / "sd15" / name / "config.json").read_text(encoding="utf-8"))


def _sd15_models(modes: list[str], device: torch.device, dtype: torch.dtype) -> BenchModels:
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    text_config = CLIPTextConfig.from_dict(_config("text_encoder"))
    if text_config.vocab_size < len(tokenizer):
        raise ValueError("the text encoder's vocabulary does not cover the tokenizer")
    unet_config = _config("unet")
    unet = UNet2DConditionModel.from_config(unet_config)
    scheduler = DDIMScheduler.load_config(str(CONFIGS / "sd15" / "scheduler"))

    def base_with(unet_model: Any) -> BaseModel:
        return BaseModel(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            unet=_place(unet_model, device, dtype),
            vae=vae,
            scheduler_config=dict(scheduler),
            source="sd15-random",
            device=device,
            dtype=dtype,
        )

    text_encoder = _place(CLIPTextModel(text_config), device, dtype)
    vae = _place(AutoencoderKL.from_config(_config("vae")), device, dtype)
    models = BenchModels(base_with(unet))
    if "controlnet" in modes:
        controlnet = ControlNetModel.from_unet(unet)
        _randomize_zero_convs(controlnet)
        models.controlnet = _place(controlnet, device, dtype)
    if "pix2pix" in modes:
        models.pix2pix = base_with(
            UNet2DConditionModel.from_config({**unet_config, "in_channels": 8})
        )
    return models


def save_sd15_folder(folder: Path) -> Path:
    """A diffusers folder of SD 1.5's architecture with random weights (safetensors, fp32)."""
    import shutil

    models = _sd15_models(["text2video"], torch.device("cpu"), torch.float32)
    base = models.base
    for name in ("text_encoder", "unet", "vae"):
        getattr(base, name).save_pretrained(folder / name, safe_serialization=True)
    write_tiny_tokenizer(folder / "tokenizer")
    shutil.copytree(CONFIGS / "sd15" / "scheduler", folder / "scheduler")
    return folder
