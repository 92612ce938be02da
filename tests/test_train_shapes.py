"""The shapes training recipe (tools/train_shapes.py) on a few scenes and steps: what its SDXL
stages save loads through the real loader as an SDXL model and ControlNet, and runs a job.
(Training to quality is never run here: the trained weights are committed.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from backend.models.tiny import SHIPPED_DIR
from tools import train_shapes
from tools.train_shapes import TrainConfig, Trainer


@pytest.fixture(scope="module")
def trained_xl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the SD 1.x base's autoencoder and tokenizer and two-step XL stages."""
    out = tmp_path_factory.mktemp("train")
    (out / "shapes").mkdir()
    for sub in ("vae", "tokenizer"):
        shutil.copytree(SHIPPED_DIR / "shapes" / sub, out / "shapes" / sub)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads stall on a busy machine (see train_shapes --threads)
    try:
        trainer = Trainer(TrainConfig(scenes=48), out, workers=1, steps=2)
        trainer.train_base_xl()
        trainer.train_controlnet_xl()
    finally:
        torch.set_num_threads(threads)
    return out


def test_xl_stages_save_an_sdxl_model_the_loader_reads(trained_xl: Path) -> None:
    from backend.models.families import check_model
    from backend.models.loading import load_base_model, load_controlnet

    base = load_base_model(str(trained_xl / "shapes-xl"), dtype=torch.float32)
    controlnet = load_controlnet(str(trained_xl / "shapes-xl-controlnet"), dtype=torch.float32)
    assert base.family.key == "sdxl"
    check_model(base, [controlnet])  # same family, added conditions of the right width
    # The autoencoder and tokenizers are the SD 1.x base's, byte for byte.
    for source, copy in (("vae", "vae"), ("tokenizer", "tokenizer"), ("tokenizer", "tokenizer_2")):
        for path in (trained_xl / "shapes" / source).iterdir():
            assert (trained_xl / "shapes-xl" / copy / path.name).read_bytes() == path.read_bytes()


def test_xl_unet_has_sdxls_layout() -> None:
    config = train_shapes.unet_xl_config()
    assert config["down_block_types"][0] == "DownBlock2D"  # no attention at full resolution
    assert config["cross_attention_dim"] == sum(train_shapes.XL_TEXT_DIMS)
    # Six size/crop ids of ADDED_TIME_DIM each beside the second encoder's pooled text.
    assert config["projection_class_embeddings_input_dim"] == (
        6 * train_shapes.ADDED_TIME_DIM + train_shapes.XL_TEXT_DIMS[1]
    )


def test_xl_training_conditions_match_the_engines(trained_xl: Path) -> None:
    """The text states and size ids the XL stages train on are the ones the engine feeds."""
    from backend.models.families import added_conditions, encode_text
    from backend.models.loading import load_base_model

    base = load_base_model(str(trained_xl / "shapes-xl"), dtype=torch.float32)
    prompt = "a red circle on a blue background"
    engine_text = encode_text(base, [prompt])
    ids = train_shapes.tokenize(base.tokenizer, [prompt])
    with torch.no_grad():
        hidden, pooled = Trainer.encode_xl(base.text_encoder, base.text_encoder_2, ids)
    torch.testing.assert_close(hidden, engine_text.embeds)
    torch.testing.assert_close(pooled, engine_text.pooled)
    trainer = Trainer(TrainConfig(), trained_xl, workers=1)
    engine_ids = added_conditions(engine_text, 64, 64, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(trainer.xl_conditions(pooled)["time_ids"], engine_ids["time_ids"])


def test_xl_empty_prompt_trains_the_engines_zero_negative(trained_xl: Path) -> None:
    """SDXL's unconditional branch is all zeros (force_zeros_for_empty_prompt), so the
    training's dropped prompts must be zeros too, and the saved pipeline must say so."""
    import json

    from backend.models.families import encode_text
    from backend.models.loading import load_base_model

    index = json.loads((trained_xl / "shapes-xl" / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True
    base = load_base_model(str(trained_xl / "shapes-xl"), dtype=torch.float32)
    negative = encode_text(base, [""], negatives=[True])
    assert not negative.embeds.any() and not negative.pooled.any()


def test_xl_stage_names_run_their_methods() -> None:
    for stage in train_shapes.XL_STAGES:
        assert callable(getattr(Trainer, f"train_{stage.replace('-', '_')}"))
