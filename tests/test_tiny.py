"""backend/models/tiny.py: the built-in tiny models and their cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import backend.models.tiny as tiny
from backend.models.tiny import TINY_KINDS, TINY_REVISION, build_tiny, cache_dir, ensure_builtin


def weight_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_built_folders_are_diffusers_folders_with_safetensors_only(
    tiny_models: dict[str, Path],
) -> None:
    for kind in ("tiny", "tiny-pix2pix"):
        files = weight_files(tiny_models[kind])
        for sub in ("unet", "vae"):
            assert f"{sub}/config.json" in files
            assert f"{sub}/diffusion_pytorch_model.safetensors" in files
        assert "text_encoder/model.safetensors" in files
        assert "scheduler/scheduler_config.json" in files
        assert any(f.startswith("tokenizer/") for f in files)
        assert not [f for f in files if f.endswith((".bin", ".ckpt", ".pt"))]
    cn_files = weight_files(tiny_models["tiny-controlnet"])
    assert cn_files == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_model_shapes(tiny_base: Any, tiny_pix2pix: Any, tiny_controlnet: Any) -> None:
    assert tiny_base.in_channels == 4 and tiny_pix2pix.in_channels == 8
    assert tiny_base.vae_scale_factor == 8  # like SD: 64 px -> 8 latent pixels
    assert tiny_base.unet.config.cross_attention_dim == tiny_base.text_encoder.config.hidden_size
    assert tiny_controlnet.config.cross_attention_dim == tiny.CROSS_DIM


def test_build_is_deterministic(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    build_tiny("tiny-controlnet", tmp_path / "again")
    name = "diffusion_pytorch_model.safetensors"
    a = load_file(str(tiny_models["tiny-controlnet"] / name))
    b = load_file(str(tmp_path / "again" / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def test_tiny_controlnet_is_not_a_no_op(tiny_controlnet: Any) -> None:
    """Zero convolutions are random and the conditioning embedding passes the image through."""
    for block in tiny_controlnet.controlnet_down_blocks:
        assert block.weight.abs().sum() > 0
    assert tiny_controlnet.controlnet_mid_block.weight.abs().sum() > 0
    black, white = torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64)
    square = black.clone()
    square[..., 16:48, 16:48] = 1
    embed = tiny_controlnet.controlnet_cond_embedding(torch.cat([black, white, square]))
    scale = embed.abs().mean()
    assert (embed[0] - embed[1]).abs().mean() > 0.2 * scale
    assert (embed[0] - embed[2]).abs().mean() > 0.1 * scale


def test_tokenizer_has_one_token_per_character(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    tiny.write_tiny_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    ids = tokenizer("cat dog").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 2 + 6  # c a t</w> d o g</w>
    assert tokenizer.decode(ids, skip_special_tokens=True) == "cat dog"
    assert len(tokenizer) == 2 * 256 + 2


def test_unknown_kinds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tiny-pix2pix"):
        build_tiny("huge", tmp_path / "x")
    with pytest.raises(ValueError, match="builtin:tiny-controlnet"):
        ensure_builtin("builtin:huge")
    assert not (tmp_path / "x").exists()


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2VZ_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("T2VZ_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "blender_t2vz"


def test_ensure_builtin_builds_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("T2VZ_CACHE_DIR", str(tmp_path))
    builds: list[tuple[str, Path]] = []

    def fake_build(kind: str, folder: Path) -> Path:
        builds.append((kind, folder))
        (folder / "marker").write_text(kind)
        return folder

    monkeypatch.setattr(tiny, "build_tiny", fake_build)
    first = ensure_builtin("builtin:tiny-pix2pix")
    assert first == tmp_path / f"tiny-pix2pix-r{TINY_REVISION}"
    assert (first / "marker").read_text() == "tiny-pix2pix"
    assert ensure_builtin("tiny-pix2pix") == first  # the prefix is optional
    assert len(builds) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no staging left


def test_a_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2VZ_CACHE_DIR", str(tmp_path))

    def broken_build(kind: str, folder: Path) -> Path:
        (folder / "half").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "build_tiny", broken_build)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_builtin("builtin:tiny")
    assert list(tmp_path.iterdir()) == []


def test_every_kind_is_in_the_session_cache(tiny_models: dict[str, Path]) -> None:
    """builtin:<kind> resolves to the session's prebuilt folders (no rebuild in tests)."""
    assert set(tiny_models) == set(TINY_KINDS)
    for kind, folder in tiny_models.items():
        assert ensure_builtin(f"builtin:{kind}") == folder
