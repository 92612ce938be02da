"""LoRAs and textual inversion embeddings on the tiny model (backend/adapters.py, runner).

The LoRA is made here with peft on builtin:tiny's UNet (random, non-zero B matrices so it
has an effect) and saved the way diffusers' training scripts save one; the embedding is a
diffusers-format textual inversion file. Behaviour is compared on latents.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.models import ModelCache, ModelLoadError, load_base_model
from backend.protocol import JobError, validate_job
from backend.runner import run_job

TOKEN = "<shiny>"


def make_job(out: Path, **fields: Any):
    data = {
        "prompt": f"a {TOKEN} cat",
        "out": str(out),
        "model": "builtin:tiny",
        "frames": 2,
        "width": 64,
        "height": 64,
        "steps": 3,
        "device": "cpu",
        "write_mp4": False,
        "save_latents": True,
        **fields,
    }
    return validate_job(data)


def latents(out: Path) -> np.ndarray:
    return np.load(out / "latents.npy")


@pytest.fixture(scope="module")
def lora_file(tiny_models: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4 LoRA on the tiny UNet's attention projections, saved as diffusers does."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = load_base_model(str(tiny_models["tiny"]))
    torch.manual_seed(0)
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        init_lora_weights=False,  # random A and B: the LoRA changes the output
    )
    base.unet.add_adapter(config)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(base.unet))
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def embedding_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-vector textual inversion embedding for the tiny text encoder (width 32)."""
    import torch
    from safetensors.torch import save_file

    from backend.tiny import CROSS_DIM

    folder = tmp_path_factory.mktemp("embedding")
    vector = torch.randn(CROSS_DIM, generator=torch.Generator().manual_seed(5)) * 3.0
    path = folder / "shiny.safetensors"
    save_file({TOKEN: vector}, str(path))
    return path


def _unet_state(cache: ModelCache) -> dict[str, Any]:
    (base,) = cache._bases.values()
    return {k: v.clone() for k, v in base.unet.state_dict().items()}


def test_lora_weight_0_is_no_lora_and_weight_1_changes_the_output(
    tmp_path: Path, tiny_models: dict, lora_file: Path
) -> None:
    cache = ModelCache()
    run_job(make_job(tmp_path / "plain"), cache)
    plain_state = _unet_state(cache)
    lora0 = [{"path": str(lora_file), "weight": 0.0}]
    run_job(make_job(tmp_path / "w0", loras=lora0), cache)
    run_job(make_job(tmp_path / "w1", loras=[{"path": str(lora_file), "weight": 1.0}]), cache)
    run_job(make_job(tmp_path / "after"), cache)
    assert cache.loads == 1  # one load: the LoRA jobs reused the cached model

    np.testing.assert_array_equal(latents(tmp_path / "w0"), latents(tmp_path / "plain"))
    change = np.abs(latents(tmp_path / "w1") - latents(tmp_path / "plain")).mean()
    assert change > 1e-3, change
    # The cached model is clean again: same weights, and the same latents as a fresh load.
    after_state = _unet_state(cache)
    assert after_state.keys() == plain_state.keys()
    for key, value in plain_state.items():
        assert after_state[key].equal(value), key
    fresh = ModelCache()
    run_job(make_job(tmp_path / "fresh"), fresh)
    np.testing.assert_array_equal(latents(tmp_path / "after"), latents(tmp_path / "fresh"))
    np.testing.assert_array_equal(latents(tmp_path / "after"), latents(tmp_path / "plain"))


def test_lora_weight_scales_its_effect(tmp_path: Path, tiny_models: dict, lora_file: Path) -> None:
    cache = ModelCache()
    run_job(make_job(tmp_path / "plain"), cache)
    for name, weight in (("half", 0.5), ("full", 1.0)):
        run_job(
            make_job(tmp_path / name, loras=[{"path": str(lora_file), "weight": weight}]), cache
        )
    plain = latents(tmp_path / "plain")
    half = np.abs(latents(tmp_path / "half") - plain).mean()
    full = np.abs(latents(tmp_path / "full") - plain).mean()
    assert 0 < half < full, (half, full)


def test_embedding_token_changes_the_output_and_leaves_the_tokenizer_clean(
    tmp_path: Path, tiny_models: dict, embedding_file: Path
) -> None:
    cache = ModelCache()
    run_job(make_job(tmp_path / "plain"), cache)
    (base,) = cache._bases.values()
    vocab = len(base.tokenizer)
    rows = base.text_encoder.get_input_embeddings().weight.shape[0]
    embeddings = [{"path": str(embedding_file), "token": TOKEN}]
    run_job(make_job(tmp_path / "with"), cache)  # same prompt, no embedding: same result
    run_job(make_job(tmp_path / "emb", embeddings=embeddings), cache)
    run_job(make_job(tmp_path / "after"), cache)

    np.testing.assert_array_equal(latents(tmp_path / "with"), latents(tmp_path / "plain"))
    change = np.abs(latents(tmp_path / "emb") - latents(tmp_path / "plain")).mean()
    assert change > 1e-3, change
    (base,) = cache._bases.values()
    assert len(base.tokenizer) == vocab
    assert TOKEN not in base.tokenizer.get_vocab()
    assert base.text_encoder.get_input_embeddings().weight.shape[0] == rows
    np.testing.assert_array_equal(latents(tmp_path / "after"), latents(tmp_path / "plain"))
    assert cache.loads == 1


def test_a_failed_adapter_leaves_the_model_clean(
    tmp_path: Path, tiny_models: dict, lora_file: Path, embedding_file: Path
) -> None:
    cache = ModelCache()
    run_job(make_job(tmp_path / "plain"), cache)
    bad = tmp_path / "not_a_lora.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(bad))
    job = make_job(
        tmp_path / "bad",
        loras=[{"path": str(lora_file), "weight": 1.0}, {"path": str(bad), "weight": 1.0}],
        embeddings=[{"path": str(embedding_file), "token": TOKEN}],
    )
    with pytest.raises(ModelLoadError, match="not_a_lora"):
        run_job(job, cache)
    assert not (tmp_path / "bad").exists()
    run_job(make_job(tmp_path / "after"), cache)
    np.testing.assert_array_equal(latents(tmp_path / "after"), latents(tmp_path / "plain"))


def test_pickled_lora_is_refused_unless_allowed(tmp_path: Path, tiny_models: dict) -> None:
    pickled = tmp_path / "lora.ckpt"
    pickled.write_bytes(b"not really")
    job = make_job(tmp_path / "out", loras=[{"path": str(pickled)}])
    with pytest.raises(ModelLoadError, match="pickled"):
        run_job(job, ModelCache())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"loras": [{"weight": 1.0}]}, "loras[0].path: is required"),
        ({"loras": [{"path": "a.safetensors", "weight": 11}]}, "loras[0].weight"),
        ({"loras": [{"path": "a.safetensors", "scale": 1}]}, "loras[0].scale: unknown field"),
        ({"embeddings": [{"path": "e.safetensors"}]}, "embeddings[0].token: is required"),
        ({"embeddings": [{"path": "e.pt", "token": "two words"}]}, "one word"),
        (
            {"embeddings": [{"path": "a", "token": "<t>"}, {"path": "b", "token": "<t>"}]},
            "embeddings[1].token: '<t>' is used twice",
        ),
    ],
)
def test_bad_adapter_fields_name_the_field(tmp_path: Path, fields: dict, message: str) -> None:
    with pytest.raises(JobError, match=re.escape(message)):
        make_job(tmp_path / "out", **fields)


def test_a_lora_given_as_a_path_string_gets_weight_1(tmp_path: Path) -> None:
    job = make_job(tmp_path / "out", loras=["style.safetensors"])
    assert job.to_dict()["loras"] == [{"path": "style.safetensors", "weight": 1.0}]


def test_a_multi_vector_embedding_is_expanded_and_removed(
    tmp_path: Path, tiny_models: dict
) -> None:
    import torch
    from safetensors.torch import save_file

    from backend.tiny import CROSS_DIM

    path = tmp_path / "two.safetensors"
    vectors = torch.randn(2, CROSS_DIM, generator=torch.Generator().manual_seed(6)) * 3.0
    save_file({"emb_params": vectors}, str(path))  # A1111 layout: two vectors, one token
    cache = ModelCache()
    run_job(make_job(tmp_path / "plain"), cache)
    (base,) = cache._bases.values()
    vocab = len(base.tokenizer)
    run_job(make_job(tmp_path / "emb", embeddings=[{"path": str(path), "token": TOKEN}]), cache)
    (base,) = cache._bases.values()
    assert len(base.tokenizer) == vocab
    assert not any(TOKEN in t for t in base.tokenizer.get_vocab())
    change = np.abs(latents(tmp_path / "emb") - latents(tmp_path / "plain")).mean()
    assert change > 1e-3, change
