"""backend/models/adapters.py on SDXL: LoRAs through diffusers' SDXL loader, and embeddings
with one vector set per text encoder (clip_l, clip_g), applied for one job and removed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from backend.engine.pipeline import TextToVideoZero
from backend.models.adapters import applied_adapters, convert_prompt
from backend.models.loading import ModelLoadError, load_base_model
from backend.protocol import EmbeddingSpec, LoraSpec

TOKEN = "<shiny>"


@pytest.fixture(scope="module")
def xl(tiny_family_models: dict) -> Any:
    return load_base_model(str(tiny_family_models["tiny-xl"]))


def generate(base: Any, pipe: Any = None, prompt: str = f"a {TOKEN} cat") -> torch.Tensor:
    return TextToVideoZero(base)(
        convert_prompt(pipe, base, prompt),
        num_frames=2,
        height=64,
        width=64,
        num_inference_steps=3,
        motion_dynamics=False,
    )


@pytest.fixture(scope="module")
def xl_lora(tiny_family_models: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4 LoRA on the tiny SDXL UNet's attention, saved as diffusers' SDXL scripts do."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = load_base_model(str(tiny_family_models["tiny-xl"]))
    torch.manual_seed(0)
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        init_lora_weights=False,
    )
    base.unet.add_adapter(config)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(base.unet))
    folder = tmp_path_factory.mktemp("xl-lora")
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers)
    return folder / "pytorch_lora_weights.safetensors"


def test_an_sdxl_lora_changes_the_output_and_is_removed(xl: Any, xl_lora: Path) -> None:
    plain = generate(xl)
    state = {k: v.clone() for k, v in xl.unet.state_dict().items()}
    with applied_adapters(xl, [LoraSpec(str(xl_lora), 1.0)]) as pipe:
        with_lora = generate(xl, pipe)
    assert (with_lora - plain).abs().mean() > 1e-3
    assert xl.unet.state_dict().keys() == state.keys()
    torch.testing.assert_close(generate(xl), plain, rtol=0, atol=0)


def test_an_sdxl_embedding_loads_into_both_text_encoders_and_is_removed(
    xl: Any, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(5)
    path = tmp_path / "shiny-xl.safetensors"
    save_file(
        {
            "clip_l": torch.randn(2, 32, generator=gen) * 3,
            "clip_g": torch.randn(2, 48, generator=gen) * 3,
        },
        str(path),
    )
    sizes = (len(xl.tokenizer), len(xl.tokenizer_2))
    rows = xl.text_encoder_2.get_input_embeddings().weight.shape[0]
    plain = generate(xl)
    with applied_adapters(xl, embeddings=[EmbeddingSpec(str(path), TOKEN)]) as pipe:
        assert convert_prompt(pipe, xl, f"a {TOKEN}") == f"a {TOKEN} {TOKEN}_1"
        assert TOKEN in xl.tokenizer.get_vocab() and TOKEN in xl.tokenizer_2.get_vocab()
        second = xl.text_encoder_2.get_input_embeddings().weight
        token_id = xl.tokenizer_2.convert_tokens_to_ids(TOKEN)
        torch.testing.assert_close(second[token_id], load_file(str(path))["clip_g"][0])
        with_embedding = generate(xl, pipe)
    assert (with_embedding - plain).abs().mean() > 1e-3
    assert (len(xl.tokenizer), len(xl.tokenizer_2)) == sizes
    assert xl.text_encoder_2.get_input_embeddings().weight.shape[0] == rows
    torch.testing.assert_close(generate(xl), plain, rtol=0, atol=0)


def test_an_sd1_embedding_on_sdxl_says_what_it_lacks(xl: Any, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "sd1.safetensors"
    save_file({TOKEN: torch.randn(32)}, str(path))
    adapters = applied_adapters(xl, embeddings=[EmbeddingSpec(str(path), TOKEN)])
    with pytest.raises(ModelLoadError, match="clip_l, clip_g.*no clip_l, clip_g"), adapters:
        pass
    assert TOKEN not in xl.tokenizer.get_vocab() and TOKEN not in xl.tokenizer_2.get_vocab()
