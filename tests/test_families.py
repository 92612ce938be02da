"""backend/models/families.py: telling SD 1.x, 2.x and SDXL apart from the model itself, and
encoding text, added conditions and VAE settings per family (the tiny models of each)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from backend.models.families import (
    SD1,
    SD2,
    SDXL,
    FamilyError,
    added_conditions,
    check_added_conditions,
    check_same_family,
    ddim_config,
    encode_text,
    family_from_file,
    family_from_folder,
    family_from_keys,
    family_from_unet_config,
    time_ids,
    zeros_for_empty_negative,
)
from backend.models.loading import load_base_model


@pytest.fixture(scope="module")
def xl(tiny_family_models: dict) -> Any:
    return load_base_model(str(tiny_family_models["tiny-xl"]))


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("config", "family"),
    [
        ({"cross_attention_dim": 768}, SD1),  # SD 1.5
        ({"cross_attention_dim": 1024, "use_linear_projection": True}, SD2),  # SD 2.1
        ({"cross_attention_dim": 1024}, SD2),  # 2.0-style config without the flag
        ({"cross_attention_dim": 2048, "addition_embed_type": "text_time"}, SDXL),
    ],
)
def test_family_from_unet_config(config: dict, family: Any) -> None:
    assert family_from_unet_config(config) is family


def test_the_tiny_folders_are_read_as_their_families(
    tiny_models: dict, tiny_family_models: dict
) -> None:
    expected = {
        "tiny": SD1, "tiny-controlnet": SD1, "tiny-pix2pix": SD1, "tiny-sd2": SD2,
        "tiny-xl": SDXL, "tiny-xl-controlnet": SDXL, "tiny-xl-pix2pix": SDXL,
    }  # fmt: skip
    folders = {**tiny_models, **tiny_family_models}
    assert {kind: family_from_folder(folders[kind]) for kind in expected} == expected


def test_a_folder_name_never_decides(tiny_family_models: dict, tmp_path: Path) -> None:
    """An SDXL model saved under an SD 1.5-sounding name is still SDXL, and the reverse."""
    renamed = tmp_path / "stable-diffusion-v1-5"
    shutil.copytree(tiny_family_models["tiny-xl"], renamed)
    assert family_from_folder(renamed) is SDXL
    assert load_base_model(str(renamed)).family is SDXL
    assert family_from_folder(tmp_path) is None  # no configs: nothing to tell


def _header_file(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("shapes", "family"),
    [
        # Original-format checkpoints: the text encoder's prefix decides.
        ({"cond_stage_model.transformer.text_model.final_layer_norm.weight": (8,)}, SD1),
        ({"cond_stage_model.model.ln_final.weight": (8,)}, SD2),
        ({"conditioner.embedders.1.model.ln_final.weight": (8,)}, SDXL),
        # Lone UNets / ControlNets: the added embedding, the text width, the projections.
        ({"control_model.label_emb.0.0.weight": (4, 8)}, SDXL),
        ({"add_embedding.linear_1.weight": (4, 8)}, SDXL),
        ({"a.attn2.to_k.weight": (320, 1024), "a.proj_in.weight": (320, 320)}, SD2),
        ({"a.attn2.to_k.weight": (320, 768), "a.proj_in.weight": (320, 320, 1, 1)}, SD1),
        ({"a.attn2.to_k.weight": (32, 32), "a.proj_in.weight": (32, 32)}, SD2),
        ({"conv.weight": (4, 4)}, None),
    ],
)
def test_family_from_tensor_names(
    tmp_path: Path, shapes: dict[str, tuple[int, ...]], family: Any
) -> None:
    assert family_from_keys(shapes) is family
    assert family_from_file(_header_file(tmp_path / "model.safetensors", shapes)) is family


def test_a_pickle_is_not_opened_to_tell_its_family(tmp_path: Path) -> None:
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"not unpickled")
    assert family_from_file(pickled) is None


def test_a_controlnet_of_another_family_is_refused_naming_both() -> None:
    check_same_family(SDXL, SDXL, "base", "cn")
    with pytest.raises(FamilyError, match=r"'cn' is an SD 1\.x ControlNet.*'my-xl' is SDXL"):
        check_same_family(SDXL, SD1, "my-xl", "cn")


# --------------------------------------------------------------------------- text


def test_sdxl_text_is_both_encoders_penultimate_states_and_the_pooled_projection(xl: Any) -> None:
    """As StableDiffusionXLPipeline.encode_prompt: (77, 32 + 48) hidden states and the second
    encoder's pooled projection; an empty negative prompt is zeros."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**xl.pipeline_components())
    text = encode_text(xl, ["", "a red cat"], negatives=[True, False])
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        "a red cat", device=xl.device, do_classifier_free_guidance=True
    )
    assert text.embeds.shape == (2, 77, 80) and text.pooled.shape == (2, 32)
    torch.testing.assert_close(text.embeds[1:], embeds)
    torch.testing.assert_close(text.pooled[1:], pooled)
    assert not negative.any() and not negative_pooled.any()
    assert not text.embeds[0].any() and not text.pooled[0].any()
    # A negative prompt that is not empty is encoded, and an empty positive one too.
    spoken = encode_text(xl, ["", "ugly"], negatives=[False, True])
    assert spoken.embeds[0].any() and spoken.embeds[1].any()
    assert text.own[1].sum() == len("aredcat")  # tiny vocabulary: a token a character


def test_sdxl_added_conditions_are_the_pooled_text_and_six_size_ids(xl: Any) -> None:
    text = encode_text(xl, ["a", "b"])
    added = added_conditions(text, 96, 128, xl.device, xl.dtype)
    assert added["text_embeds"] is text.pooled
    assert added["time_ids"].tolist() == [[96, 128, 0, 0, 96, 128]] * 2
    assert time_ids(1024, 1024) == [1024, 1024, 0, 0, 1024, 1024]
    check_added_conditions(xl.unet, 32)
    with pytest.raises(ValueError, match="added embedding takes 80 inputs.*make 86"):
        check_added_conditions(xl.unet, 38)  # a pooled text of another width


def test_sd1_text_has_no_pooled_output_or_added_conditions(tiny_base: Any) -> None:
    text = encode_text(tiny_base, ["a cat"])
    assert text.pooled is None
    assert added_conditions(text, 64, 64, tiny_base.device, tiny_base.dtype) is None
    with torch.no_grad():
        expected = tiny_base.text_encoder(
            tiny_base.tokenizer(
                ["a cat"], padding="max_length", max_length=77, return_tensors="pt"
            ).input_ids
        )[0]
    torch.testing.assert_close(text.embeds, expected)  # the last hidden state, as before


def test_force_zeros_for_empty_prompt_comes_from_model_index(
    tiny_family_models: dict, tmp_path: Path
) -> None:
    folder = tmp_path / "xl"
    shutil.copytree(tiny_family_models["tiny-xl"], folder)
    assert zeros_for_empty_negative(folder, SDXL) is True
    index = json.loads((folder / "model_index.json").read_text())
    index["force_zeros_for_empty_prompt"] = False
    (folder / "model_index.json").write_text(json.dumps(index))
    assert zeros_for_empty_negative(folder, SDXL) is False
    assert load_base_model(str(folder)).zero_empty_negative is False
    assert zeros_for_empty_negative(None, SD1) is False


def test_ddim_settings_fill_a_config_saved_for_another_sampler() -> None:
    euler = {"beta_schedule": "scaled_linear", "timestep_spacing": "leading"}
    assert ddim_config(euler) == {**euler, "clip_sample": False, "set_alpha_to_one": False}
    assert ddim_config({"clip_sample": True})["clip_sample"] is True  # the model's own wins


# --------------------------------------------------------------------------- the Hub


def test_an_sdxl_repo_loads_from_the_hub_stand_in_with_both_text_encoders(
    tiny_family_models: dict, xl: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from fakehub import FakeHub, use_in_process

    folder = tiny_family_models["tiny-xl"]
    repo = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with FakeHub({"test/tiny-xl": repo}) as hub:
        use_in_process(hub, monkeypatch.setattr, tmp_path / "cache")
        loaded = load_base_model("test/tiny-xl")
        sent = hub.files_sent()
    assert loaded.family is SDXL
    assert any("text_encoder_2/" in f for f in sent) and any("tokenizer_2/" in f for f in sent)
    for module in ("unet", "text_encoder", "text_encoder_2", "vae"):
        want, got = getattr(xl, module).state_dict(), getattr(loaded, module).state_dict()
        assert all(got[k].equal(v) for k, v in want.items()), module


# --------------------------------------------------------------------------- single files


@pytest.mark.parametrize("kind", ["tiny-xl", "tiny-sd2", "tiny-xl-pix2pix"])
def test_a_single_file_checkpoint_loads_as_its_family(
    tiny_family_models: dict, tmp_path: Path, kind: str
) -> None:
    """SDXL (SGM layout: CLIP-L and OpenCLIP-bigG) and SD 2.x (OpenCLIP-H) single files load
    through diffusers' single-file loader with the right pipeline, weights intact."""
    from ldm_export import export_family_checkpoint

    folder = tiny_family_models[kind]
    path = export_family_checkpoint(folder, tmp_path / f"{kind}-finetune.safetensors")
    pix2pix = kind.endswith("pix2pix")
    want = load_base_model(str(folder), pix2pix=pix2pix)
    assert family_from_file(path) is want.family
    got = load_base_model(str(path), config=str(folder), pix2pix=pix2pix)
    assert got.family is want.family
    modules = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if want.text_encoder_2 else [])
    for module in modules:
        a, b = getattr(want, module).state_dict(), getattr(got, module).state_dict()
        assert a.keys() == b.keys(), module
        assert all(b[k].equal(v) for k, v in a.items()), module
    assert got.zero_empty_negative == want.zero_empty_negative
    assert got.scheduler_config["prediction_type"] == want.scheduler_config["prediction_type"]


def test_a_single_file_without_configs_asks_for_its_familys_configs(
    tiny_family_models: dict, tmp_path: Path
) -> None:
    """Offline and with no --model-config, an SDXL file asks for SDXL's configs repo (not
    SD 1.5's), by name, in the error."""
    from ldm_export import export_family_checkpoint

    from backend.models.loading import ModelLoadError

    path = export_family_checkpoint(tiny_family_models["tiny-xl"], tmp_path / "xl.safetensors")
    with pytest.raises(ModelLoadError, match="stable-diffusion-xl-base-1.0"):
        load_base_model(str(path))


def test_a_single_file_sdxl_controlnet_loads_and_defaults_to_the_shipped_sdxl_config(
    tiny_family_models: dict, tmp_path: Path
) -> None:
    """An SDXL ControlNet shipped as one .safetensors loads with its folder's config; given
    none, the shipped SDXL ControlNet config (SDXL's architecture, 1.25 B parameters) is
    the one tried, not SD 1.5's, and the error says so."""
    from diffusers import ControlNetModel

    from backend.models.loading import (
        SDXL_CONTROLNET_CONFIG,
        ModelLoadError,
        load_controlnet,
    )

    folder = tiny_family_models["tiny-xl-controlnet"]
    path = tmp_path / "controlnet-xl.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", path)
    assert family_from_file(path) is SDXL
    want = load_controlnet(str(folder))
    got = load_controlnet(str(path), config=str(folder))
    assert all(got.state_dict()[k].equal(v) for k, v in want.state_dict().items())
    with pytest.raises(ModelLoadError, match="with the SDXL ControlNet config"):
        load_controlnet(str(path))  # the tiny weights do not fit SDXL's full architecture
    config = json.loads((SDXL_CONTROLNET_CONFIG / "config.json").read_text())
    assert family_from_unet_config(config) is SDXL
    with torch.device("meta"):
        full = ControlNetModel.from_config(config)
    assert 1.2e9 < sum(p.numel() for p in full.parameters()) < 1.3e9
