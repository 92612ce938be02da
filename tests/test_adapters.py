"""LoRAs and textual inversion embeddings on the tiny model (backend/models/adapters.py, runner).

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

from backend.models.loading import ModelCache, ModelLoadError, load_base_model
from backend.protocol import JobError, validate_job
from backend.service.runner import run_job

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

    from backend.models.tiny import CROSS_DIM

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


def test_a_pickled_lora_loads_when_the_caller_allows_it(
    tmp_path: Path, tiny_models: dict, lora_file: Path
) -> None:
    """The runner's allow_pickle reaches the adapters: the same LoRA pickled (.bin) applies
    like its .safetensors file once the caller allows pickles."""
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "lora.bin"
    torch.save(load_file(str(lora_file)), str(pickled))
    cache = ModelCache()
    run_job(make_job(tmp_path / "safe", loras=[{"path": str(lora_file)}]), cache)
    pickled_job = make_job(tmp_path / "pickled", loras=[{"path": str(pickled)}])
    run_job(pickled_job, cache, allow_pickle=True)
    np.testing.assert_array_equal(latents(tmp_path / "pickled"), latents(tmp_path / "safe"))


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

    from backend.models.tiny import CROSS_DIM

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


# --------------------------------------------------------------------------- from the hub

LORA_REPO = "test/lora"
MB = 1 << 20


@pytest.fixture
def adapter_hub(
    lora_file: Path, embedding_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Any:
    """A fake Hub (this process online, hub cache in tmp_path/hub-cache) with adapter repos:
    test/lora (diffusers' LoRA name, plus a training checkpoint and a README that are never
    fetched), test/embedding (one .safetensors of another name), test/big-lora (4 MB of
    random bytes, for cancelling), test/two-loras and test/no-weights."""
    import os

    from fakehub import FakeHub, use_in_process

    lora = lora_file.read_bytes()
    repos = {
        LORA_REPO: {
            "README.md": b"# a LoRA",
            "pytorch_lora_weights.safetensors": lora,
            "checkpoint-500/pytorch_lora_weights.safetensors": os.urandom(1000),
            "checkpoint-500/optimizer.bin": os.urandom(1000),
        },
        "test/embedding": {"shiny-v2.safetensors": embedding_file.read_bytes()},
        "test/big-lora": {"pytorch_lora_weights.safetensors": os.urandom(4 * MB)},
        "test/two-loras": {"style-a.safetensors": lora, "style-b.safetensors": lora},
        "test/no-weights": {"README.md": b"# empty", "lora.ckpt": b"pickled"},
    }
    with FakeHub(repos) as hub:
        use_in_process(hub, monkeypatch.setattr, tmp_path / "hub-cache")
        yield hub


def test_a_hub_lora_downloads_with_progress_then_applies_like_the_local_file(
    tmp_path: Path, tiny_models: dict, lora_file: Path, adapter_hub: Any
) -> None:
    from backend.service.runner import JobEvents

    cache = ModelCache()
    run_job(make_job(tmp_path / "plain"), cache)
    run_job(make_job(tmp_path / "local", loras=[{"path": str(lora_file), "weight": 0.7}]), cache)
    reports: list[Any] = []
    events = JobEvents(download=reports.append)
    run_job(make_job(tmp_path / "hub", loras=[{"path": LORA_REPO, "weight": 0.7}]), cache, events)

    np.testing.assert_array_equal(latents(tmp_path / "hub"), latents(tmp_path / "local"))
    assert np.abs(latents(tmp_path / "hub") - latents(tmp_path / "plain")).mean() > 1e-3
    size = lora_file.stat().st_size
    assert reports and {r.model for r in reports} == {LORA_REPO}
    assert reports[0].file == "pytorch_lora_weights.safetensors" and reports[0].bytes_done == 0
    assert (reports[-1].bytes_done, reports[-1].bytes_total, reports[-1].files_done) == (
        size,
        size,
        1,
    )
    # Only the one weight file was fetched: not the training checkpoint, not the README.
    assert adapter_hub.files_sent() == [f"{LORA_REPO}:pytorch_lora_weights.safetensors"]

    # Downloaded once: the next job finds it in the cache (only the listing is asked for).
    asked = len(adapter_hub.requests)
    reports.clear()
    run_job(make_job(tmp_path / "again", loras=[{"path": LORA_REPO, "weight": 0.7}]), cache, events)
    np.testing.assert_array_equal(latents(tmp_path / "again"), latents(tmp_path / "local"))
    assert len(adapter_hub.requests) == asked + 1 and "/api/models/" in adapter_hub.requests[-1][1]
    assert cache.loads == 1


def test_a_hub_embedding_with_one_safetensors_file_applies_like_the_local_file(
    tmp_path: Path, tiny_models: dict, embedding_file: Path, adapter_hub: Any
) -> None:
    from backend.service.runner import JobEvents

    cache = ModelCache()
    local = [{"path": str(embedding_file), "token": TOKEN}]
    run_job(make_job(tmp_path / "local", embeddings=local), cache)
    reports: list[Any] = []
    hub = [{"path": "test/embedding", "token": TOKEN}]
    run_job(make_job(tmp_path / "hub", embeddings=hub), cache, JobEvents(download=reports.append))
    np.testing.assert_array_equal(latents(tmp_path / "hub"), latents(tmp_path / "local"))
    assert reports[-1].file == "" and reports[-1].bytes_done == embedding_file.stat().st_size
    assert [r.file for r in reports[:1]] == ["shiny-v2.safetensors"]


def test_cancelling_a_hub_lora_download_stops_it_and_applies_nothing(
    tmp_path: Path, tiny_models: dict, lora_file: Path, adapter_hub: Any
) -> None:
    from backend.engine.pipeline import Cancelled
    from backend.models.adapters import applied_adapters
    from backend.models.hub import DownloadCancelled, DownloadHooks
    from backend.protocol import LoraSpec
    from backend.service.runner import JobEvents

    cache = ModelCache()
    run_job(make_job(tmp_path / "plain"), cache)
    clean = _unet_state(cache)
    (base,) = cache._bases.values()
    vocab = len(base.tokenizer)
    adapter_hub.rate = 2 * MB  # 4 MB in about 2 s

    reports: list[Any] = []
    cancel_after_bytes = lambda: any(r.bytes_done > 0 for r in reports)  # noqa: E731
    loras = [{"path": str(lora_file), "weight": 1.0}, {"path": "test/big-lora", "weight": 1.0}]
    events = JobEvents(download=reports.append, should_cancel=cancel_after_bytes)
    with pytest.raises(Cancelled):
        run_job(make_job(tmp_path / "cancelled", loras=loras), cache, events)
    assert not (tmp_path / "cancelled").exists()
    assert 0 < reports[-1].bytes_done < 4 * MB
    assert adapter_hub.bytes_sent < 4 * MB  # the transfer stopped

    # Directly: the loader's own exception, and the model as it was (no LoRA layers).
    reports.clear()
    hooks = DownloadHooks(progress=reports.append, should_cancel=cancel_after_bytes)
    specs = [LoraSpec(str(lora_file), 1.0), LoraSpec("test/big-lora", 1.0)]
    with (
        pytest.raises(DownloadCancelled, match="test/big-lora"),
        applied_adapters(base, specs, download=hooks),
    ):
        pytest.fail("the adapters were applied")
    (base,) = cache._bases.values()
    state = _unet_state(cache)
    assert state.keys() == clean.keys()
    assert all(state[k].equal(v) for k, v in clean.items())
    assert not getattr(base.unet, "peft_config", None)
    assert len(base.tokenizer) == vocab
    run_job(make_job(tmp_path / "after"), cache)
    np.testing.assert_array_equal(latents(tmp_path / "after"), latents(tmp_path / "plain"))


@pytest.mark.parametrize(
    ("repo", "message"),
    [
        ("test/two-loras", r"LoRA 'test/two-loras' has 2 weight files \(style-a.safetensors, "
         r"style-b.safetensors\).*cannot tell which to load; name the one you want as "
         r"test/two-loras/<file>, e.g. 'test/two-loras/style-a.safetensors'"),
        ("test/two-loras/style-c.safetensors",
         r"LoRA repo 'test/two-loras' has no file 'style-c.safetensors' \(its weight files: "
         r"style-a.safetensors, style-b.safetensors\)"),
        ("test/no-weights/lora.ckpt",
         r"LoRA 'test/no-weights/lora.ckpt' is a pickled checkpoint \(.ckpt\).*--allow-pickle"),
        ("test/missing/lora.safetensors", r"LoRA 'test/missing' is not on the Hugging Face Hub"),
        ("test/two-loras/notes.txt",
         r"LoRA 'test/two-loras/notes.txt' is neither an existing file or folder nor a hub id: "
         r"a file of a hub repo must be weights ending in .safetensors"),
        ("test/no-weights", r"LoRA 'test/no-weights' has no .safetensors weights.*lora.ckpt"),
        ("test/missing", r"LoRA 'test/missing' is not on the Hugging Face Hub"),
    ],
)  # fmt: skip
def test_a_hub_lora_without_one_usable_weight_file_names_the_repo(
    tmp_path: Path, tiny_models: dict, adapter_hub: Any, repo: str, message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        run_job(make_job(tmp_path / "out", loras=[repo]), ModelCache())
    assert not (tmp_path / "out").exists()
    assert adapter_hub.files_sent() == []  # nothing was downloaded


def test_one_file_of_a_hub_repo_downloads_alone_and_applies_like_the_local_file(
    tmp_path: Path, tiny_models: dict, lora_file: Path, embedding_file: Path, adapter_hub: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from huggingface_hub import constants

    from backend.service.runner import JobEvents

    cache = ModelCache()
    local = {
        "loras": [{"path": str(lora_file), "weight": 0.7}],
        "embeddings": [{"path": str(embedding_file), "token": TOKEN}],
    }
    hub = {
        "loras": [{"path": "test/two-loras/style-b.safetensors", "weight": 0.7}],
        "embeddings": [{"path": "test/embedding/shiny-v2.safetensors", "token": TOKEN}],
    }
    run_job(make_job(tmp_path / "local", **local), cache)
    reports: list[Any] = []
    run_job(make_job(tmp_path / "hub", **hub), cache, JobEvents(download=reports.append))
    np.testing.assert_array_equal(latents(tmp_path / "hub"), latents(tmp_path / "local"))
    assert adapter_hub.files_sent() == [
        "test/two-loras:style-b.safetensors",
        "test/embedding:shiny-v2.safetensors",
    ]
    assert [(r.model, r.file) for r in reports if r.file] == [
        ("test/two-loras", "style-b.safetensors"),
        ("test/embedding", "shiny-v2.safetensors"),
    ]

    # Offline: both come from the cache, and the Hub hears nothing.
    asked = len(adapter_hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    run_job(make_job(tmp_path / "offline", **hub), cache)
    np.testing.assert_array_equal(latents(tmp_path / "offline"), latents(tmp_path / "local"))
    with pytest.raises(ModelLoadError, match=r"LoRA 'test/two-loras/style-a.safetensors' is not "):
        run_job(make_job(tmp_path / "out", loras=["test/two-loras/style-a.safetensors"]), cache)
    assert len(adapter_hub.requests) == asked


def test_an_existing_local_file_wins_over_the_hub_reading(
    tmp_path: Path, tiny_models: dict, lora_file: Path, adapter_hub: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    cache = ModelCache()
    run_job(make_job(tmp_path / "file", loras=[{"path": str(lora_file), "weight": 0.7}]), cache)
    work = tmp_path / "work"
    (work / "test" / "big-lora").mkdir(parents=True)
    (work / "test" / "big-lora" / "style.safetensors").write_bytes(lora_file.read_bytes())
    monkeypatch.chdir(work)
    lora = {"path": "test/big-lora/style.safetensors", "weight": 0.7}
    run_job(make_job(tmp_path / "relative", loras=[lora]), cache)
    np.testing.assert_array_equal(latents(tmp_path / "relative"), latents(tmp_path / "file"))
    assert adapter_hub.requests == []  # the Hub was never asked


def test_offline_a_hub_lora_comes_from_the_cache_or_the_error_says_what_to_do(
    tmp_path: Path, tiny_models: dict, lora_file: Path, adapter_hub: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from huggingface_hub import constants

    cache = ModelCache()
    run_job(make_job(tmp_path / "online", loras=[LORA_REPO]), cache)
    asked = len(adapter_hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    run_job(make_job(tmp_path / "offline", loras=[LORA_REPO]), cache)
    np.testing.assert_array_equal(latents(tmp_path / "offline"), latents(tmp_path / "online"))
    with pytest.raises(ModelLoadError) as info:
        run_job(
            make_job(tmp_path / "out", embeddings=[{"path": "test/embedding", "token": TOKEN}]),
            cache,
        )
    text = str(info.value)
    assert "embedding 'test/embedding' is not downloaded and online access is off" in text
    assert "HF_HUB_OFFLINE" in text and "a local .safetensors file" in text
    assert len(adapter_hub.requests) == asked  # offline means offline
    assert not (tmp_path / "out").exists()


def test_an_unreachable_hub_uses_the_cached_lora_or_says_it_is_out_of_reach(
    tmp_path: Path, tiny_models: dict, lora_file: Path, adapter_hub: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import socket

    from fakehub import use_in_process

    cache = ModelCache()
    run_job(make_job(tmp_path / "online", loras=[LORA_REPO]), cache)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    adapter_hub.url = closed  # (only for use_in_process: the server still listens)
    use_in_process(adapter_hub, monkeypatch.setattr, tmp_path / "hub-cache")
    run_job(make_job(tmp_path / "cached", loras=[LORA_REPO]), cache)
    np.testing.assert_array_equal(latents(tmp_path / "cached"), latents(tmp_path / "online"))
    with pytest.raises(ModelLoadError, match=r"cannot download LoRA 'test/big-lora'.*out of reach"):
        run_job(make_job(tmp_path / "out", loras=["test/big-lora"]), cache)


def test_every_vector_of_a_multi_vector_embedding_is_used_in_both_prompts(
    tmp_path: Path, tiny_models: dict
) -> None:
    """A two-vector embedding's token stands for two tokens ("<t> <t>_1"), in the prompt and
    in the negative prompt: its result differs from the embedding of its first vector alone."""
    import torch
    from safetensors.torch import save_file

    from backend.models.tiny import CROSS_DIM

    vectors = torch.randn(2, CROSS_DIM, generator=torch.Generator().manual_seed(9)) * 3.0
    two, one = tmp_path / "two.safetensors", tmp_path / "one.safetensors"
    save_file({TOKEN: vectors}, str(two))
    save_file({TOKEN: vectors[:1].clone()}, str(one))
    cache = ModelCache()
    for field in ("prompt", "negative_prompt"):
        text = {"prompt": "a cat", field: f"a {TOKEN} cat"}
        for name, path in (("two", two), ("one", one)):
            embedding = [{"path": str(path), "token": TOKEN}]
            run_job(make_job(tmp_path / f"{field}-{name}", embeddings=embedding, **text), cache)
        difference = latents(tmp_path / f"{field}-two") - latents(tmp_path / f"{field}-one")
        assert np.abs(difference).max() > 1e-3, field


# --------------------------------------------------------------------------- hostile files


def short_naming(message: str, name: str) -> None:
    """An error of at most 3 lines that names ``name`` (a file or a tensor)."""
    assert name in message, message
    assert len(message.splitlines()) <= 3, message


def _edited_copy(source: Path, target: Path, edit: Any) -> Path:
    """``source``'s tensors with ``edit(tensors)`` applied, saved as ``target``."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source))
    edit(tensors)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target))
    return target


@pytest.mark.parametrize(
    ("value", "why"), [(float("nan"), "NaN"), (float("inf"), "infinite"), (1e30, "float16")]
)
def test_a_lora_with_nan_inf_or_huge_weights_is_refused_naming_file_and_tensor(
    tmp_path: Path, tiny_models: dict, lora_file: Path, value: float, why: str
) -> None:
    name = sorted(__import__("safetensors.torch").torch.load_file(str(lora_file)))[0]

    def poison(tensors: dict) -> None:
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = value

    bad = _edited_copy(lora_file, tmp_path / "bad" / "lora.safetensors", poison)
    with pytest.raises(ModelLoadError) as info:
        run_job(make_job(tmp_path / "out", loras=[str(bad)]))
    short_naming(str(info.value), str(bad))
    assert name in str(info.value) and why in str(info.value)
    assert not (tmp_path / "out").exists()


def test_an_embedding_with_nan_values_is_refused(
    tmp_path: Path, tiny_models: dict, embedding_file: Path
) -> None:
    def poison(tensors: dict) -> None:
        tensors[TOKEN] = tensors[TOKEN].clone()
        tensors[TOKEN][3] = float("nan")

    bad = _edited_copy(embedding_file, tmp_path / "nan.safetensors", poison)
    with pytest.raises(ModelLoadError) as info:
        run_job(make_job(tmp_path / "out", embeddings=[{"path": str(bad), "token": TOKEN}]))
    short_naming(str(info.value), str(bad))
    assert "NaN" in str(info.value)


def test_a_lora_folder_with_several_weight_files_is_refused_listing_them(
    tmp_path: Path, tiny_models: dict, lora_file: Path
) -> None:
    folder = tmp_path / "loras"
    folder.mkdir()
    for name in ("style_a.safetensors", "style_b.safetensors"):
        (folder / name).write_bytes(lora_file.read_bytes())
    with pytest.raises(ModelLoadError) as info:
        run_job(make_job(tmp_path / "out", loras=[str(folder)]))
    short_naming(str(info.value), str(folder))
    assert "style_a.safetensors" in str(info.value) and "style_b.safetensors" in str(info.value)
    # A folder holding one weight file loads that file, as before.
    single = tmp_path / "one"
    single.mkdir()
    (single / "style_a.safetensors").write_bytes(lora_file.read_bytes())
    run_job(make_job(tmp_path / "ok", loras=[str(single)]))
    assert (tmp_path / "ok" / "latents.npy").is_file()


def test_a_lora_of_another_architecture_is_one_short_error(
    tmp_path: Path, tiny_models: dict, lora_file: Path
) -> None:
    import torch

    def widen(tensors: dict) -> None:  # every up-projection made for 3x wider layers
        for key in [k for k in tensors if "lora_B" in k or "lora.up" in k]:
            rows, rank = tensors[key].shape[:2]
            tensors[key] = torch.zeros(3 * rows, rank)

    other = _edited_copy(lora_file, tmp_path / "other" / "xl_lora.safetensors", widen)
    with pytest.raises(ModelLoadError) as info:
        run_job(make_job(tmp_path / "out", loras=[str(other)]))
    short_naming(str(info.value), str(other))
    assert "does not fit" in str(info.value)


def test_an_embedding_of_another_width_shows_both_sizes(tmp_path: Path, tiny_models: dict) -> None:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "sd15_embedding.safetensors"
    save_file({"emb_params": torch.randn(2, 768)}, str(path))
    with pytest.raises(ModelLoadError) as info:
        run_job(make_job(tmp_path / "out", embeddings=[{"path": str(path), "token": TOKEN}]))
    text = str(info.value)
    short_naming(text, str(path))
    assert "768" in text and "32" in text and "{" not in text and "tensor(" not in text


def test_a_truncated_lora_is_named(tmp_path: Path, tiny_models: dict, lora_file: Path) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(lora_file.read_bytes()[:-100])
    with pytest.raises(ModelLoadError) as info:
        run_job(make_job(tmp_path / "out", loras=[str(cut)]))
    short_naming(str(info.value), str(cut))
    assert "truncated" in str(info.value)
