"""bench/sdxl.py: SDXL's architecture from its configs, narrowed consistently, and the floor
making exactly the engine's UNet calls."""

from __future__ import annotations

import argparse

import pytest
import torch

from backend.engine.pipeline import TextToVideoZero
from backend.models.families import SDXL
from bench.sdxl import build_base, floor, scaled_configs


def test_the_real_configs_are_sdxl_base() -> None:
    configs = scaled_configs(1)
    unet = configs["unet"]
    assert unet["transformer_layers_per_block"] == [1, 2, 10]
    assert unet["cross_attention_dim"] == 768 + 1280
    assert unet["projection_class_embeddings_input_dim"] == 6 * 256 + 1280
    assert configs["vae"]["scaling_factor"] == 0.13025


@pytest.mark.parametrize("scale", [4, 8, 32])
def test_narrowed_configs_stay_consistent(scale: int) -> None:
    configs = scaled_configs(scale)
    unet, text, text_2 = configs["unet"], configs["text_encoder"], configs["text_encoder_2"]
    assert unet["cross_attention_dim"] == text["hidden_size"] + text_2["hidden_size"]
    expected = 6 * unet["addition_time_embed_dim"] + text_2["projection_dim"]
    assert unet["projection_class_embeddings_input_dim"] == expected
    assert unet["transformer_layers_per_block"] == [1, 2, 10]  # depths kept
    assert all(c % unet["norm_num_groups"] == 0 for c in unet["block_out_channels"])


def test_the_floor_makes_the_engines_unet_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    base = build_base(32, torch.device("cpu"), torch.float32)
    assert base.family is SDXL
    args = argparse.Namespace(size=64, frames=3, steps=3, chunk_size=2)  # t0, t1 = 1, 2
    batches: list[int] = []
    hook = base.unet.register_forward_hook(lambda m, a, k, out: batches.append(a[0].shape[0]),
                                           with_kwargs=True)  # fmt: skip
    TextToVideoZero(base)("a cat", num_frames=3, height=64, width=64, num_inference_steps=3,
                          chunk_size=2, t0=1, t1=2)  # fmt: skip
    ours, batches[:] = list(batches), []
    with torch.no_grad():
        floor(base, args)()
    hook.remove()
    assert batches == ours
