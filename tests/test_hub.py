"""backend/models/hub.py: model downloads with progress and cancel, offline mode, the cache.

Downloads go through the real huggingface_hub client in a real ``python -m backend serve``
worker, against ``fakehub.FakeHub`` on 127.0.0.1 set as ``HF_ENDPOINT``: never the
internet. The fake repos are built here (random bytes, or the tiny model's files).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakehub import FakeHub
from test_worker import WorkerProcess

from backend.models.hub import model_kind, needed_files

MB = 1 << 20
SD_REPO = [
    "README.md",
    "model_index.json",
    "v1-5-pruned.safetensors",
    "v1-5-pruned.ckpt",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.bin",
]


def test_a_pipeline_repo_needs_configs_tokenizer_and_plain_safetensors() -> None:
    assert model_kind(SD_REPO) == "base"
    assert needed_files(SD_REPO) == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_pickled_weights_only_when_allowed_and_no_safetensors() -> None:
    repo = ["config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"]
    assert model_kind(repo) == "single"
    assert needed_files(repo) == ["config.json"]
    assert needed_files(repo, allow_pickle=True) == ["config.json", "diffusion_pytorch_model.bin"]
    with_safe = [*repo, "diffusion_pytorch_model.safetensors", "images/canny.png"]
    assert needed_files(with_safe, allow_pickle=True) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]


# --------------------------------------------------------------------------- through the worker


def repo_from_folder(folder: Path) -> dict[str, bytes]:
    """A fake hub repo holding a saved diffusers model's files."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def hub_repos(tiny_models: dict[str, Path]) -> dict[str, dict[str, bytes]]:
    """test/tiny: the tiny model; test/big: a 24 MB ControlNet-shaped repo of random bytes."""
    big = {
        "config.json": b'{"_class_name": "ControlNetModel"}',
        "diffusion_pytorch_model.safetensors": os.urandom(24 * MB),
        "diffusion_pytorch_model.fp16.safetensors": os.urandom(MB),  # never fetched
    }
    return {"test/tiny": repo_from_folder(tiny_models["tiny"]), "test/big": big}


@pytest.fixture
def hub(hub_repos: dict[str, dict[str, bytes]]) -> Iterator[FakeHub]:
    with FakeHub(hub_repos) as server:
        yield server


def hub_worker(env: dict[str, str], tmp: Path, cache: Path, **extra: str) -> WorkerProcess:
    """A worker whose hub cache is ``cache``; ``extra`` sets HF_ENDPOINT, HF_HUB_OFFLINE..."""
    env = dict(env, HF_HUB_CACHE=str(cache), **extra)
    worker = WorkerProcess(env, tmp / f"stderr-{time.monotonic_ns()}.txt")
    assert worker.next()["type"] == "ready"
    return worker


def until(worker: WorkerProcess, request_id: str, kinds: set[str]) -> list[dict[str, Any]]:
    """Replies for ``request_id`` up to the first of ``kinds``."""
    out = []
    while True:
        message = worker.next(timeout=120)
        if message.get("id") == request_id:
            out.append(message)
            if message["type"] in kinds:
                return out


ENDS = {"fetched", "cancelled", "error", "done", "models", "removed"}


def test_download_reports_progress_and_cancel_leaves_a_resumable_cache(
    backend_env: dict[str, str], hub: FakeHub, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    big = hub.repos["test/big"]["diffusion_pytorch_model.safetensors"]
    wanted = len(big) + len(hub.repos["test/big"]["config.json"])
    hub.rate = 6 * MB  # 24 MB in about 4 s: progress can be watched
    worker = hub_worker(backend_env, tmp_path, cache, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    try:
        worker.send("fetch_model", id="f1", model="test/big")
        reports = []
        while True:
            message = worker.next(timeout=60)
            assert message["type"] == "download", message
            reports.append(message)
            if message["bytes_done"] > 0.4 * wanted:
                break
        cancelled_at = time.monotonic()
        worker.send("cancel", id="f1")
        replies = until(worker, "f1", ENDS)
        assert replies[-1]["type"] == "cancelled"
        assert time.monotonic() - cancelled_at < 3.0  # within a 1 MB chunk (about 0.2 s here)
        reports += [m for m in replies if m["type"] == "download"]

        # Which model, which file, bytes of the whole model, a measured rate.
        assert {r["model"] for r in reports} == {"test/big"}
        assert {r["bytes_total"] for r in reports} == {wanted}
        assert {r["files_total"] for r in reports} == {2}
        in_weights = [r for r in reports if r["file"] == "diffusion_pytorch_model.safetensors"]
        assert len(in_weights) >= 3
        done = [r["bytes_done"] for r in reports]
        assert done == sorted(done) and done[-1] < wanted
        rates = [r["rate"] for r in in_weights if r["bytes_done"] > 2 * MB]
        assert rates and all(2 * MB < rate < 12 * MB for rate in rates), rates  # 6 MB/s served
        assert hub.bytes_sent < len(big)  # the transfer stopped

        # No snapshot entry points at half a file: every finished blob is a whole file
        # (huggingface_hub either deletes its partial download or keeps it as .incomplete).
        repo = cache / "models--test--big"
        assert not list(repo.glob("snapshots/*/diffusion_pytorch_model.safetensors"))
        sizes = {len(data) for data in hub.repos["test/big"].values()}
        for blob in repo.glob("blobs/*"):
            assert blob.name.endswith(".incomplete") or blob.stat().st_size in sizes

        # The next fetch completes the model with the exact bytes served.
        hub.rate = None
        worker.send("fetch_model", id="f2", model="test/big")
        replies = until(worker, "f2", ENDS)
        assert replies[-1]["type"] == "fetched", replies[-1]
        assert replies[-2]["bytes_done"] == wanted and replies[-2]["files_done"] == 2
        path = Path(replies[-1]["path"])
        got = (path / "diffusion_pytorch_model.safetensors").read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()
        assert not (path / "diffusion_pytorch_model.fp16.safetensors").exists()
        assert not list(repo.glob("blobs/*.incomplete"))
    finally:
        worker.close()


def test_a_job_with_a_hub_id_downloads_with_progress_then_runs_and_the_cache_is_managed(
    backend_env: dict[str, str], hub: FakeHub, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    tiny = hub.repos["test/tiny"]
    job = {
        "prompt": "a cat",
        "out": str(tmp_path / "out"),
        "model": "test/tiny",
        "frames": 2,
        "width": 64,
        "height": 64,
        "steps": 2,
        "device": "cpu",
        "write_mp4": False,
    }
    worker = hub_worker(backend_env, tmp_path, cache, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    try:
        worker.send("generate", id="j1", job=job)
        replies = until(worker, "j1", ENDS)
        assert replies[-1]["type"] == "done", replies[-1]
        kinds = [m["type"] for m in replies]
        assert kinds[0] == "accepted" and "download" in kinds
        assert kinds.index("progress") > max(i for i, k in enumerate(kinds) if k == "download")
        last = [m for m in replies if m["type"] == "download"][-1]
        assert last["bytes_done"] == last["bytes_total"] == sum(len(b) for b in tiny.values())

        worker.send("list_models", id="l1")
        listed = until(worker, "l1", ENDS)[-1]
        assert listed["cache_dir"] == str(cache)
        assert [(m["model"], m["size"], m["complete"]) for m in listed["models"]] == [
            ("test/tiny", sum(len(b) for b in tiny.values()), True)
        ]
        worker.send("remove_model", id="r1", model="test/tiny")
        removed = until(worker, "r1", ENDS)[-1]
        assert removed["type"] == "removed" and removed["freed"] == listed["models"][0]["size"]
        worker.send("list_models", id="l2")
        assert until(worker, "l2", ENDS)[-1]["models"] == []
        worker.send("remove_model", id="r2", model="test/tiny")
        gone = until(worker, "r2", ENDS)[-1]
        assert gone["type"] == "error" and "test/tiny" in gone["message"]
    finally:
        worker.close()


def test_offline_uses_the_cache_and_never_asks_the_hub(
    backend_env: dict[str, str], hub: FakeHub, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    online = hub_worker(backend_env, tmp_path, cache, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    try:
        online.send("fetch_model", id="f1", model="test/tiny")
        assert until(online, "f1", ENDS)[-1]["type"] == "fetched"
    finally:
        online.close()
    asked = len(hub.requests)
    offline = hub_worker(backend_env, tmp_path, cache, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="1")
    try:
        job = {"prompt": "a cat", "out": str(tmp_path / "out"), "model": "test/tiny",
               "frames": 2, "width": 64, "height": 64, "steps": 2, "device": "cpu",
               "write_mp4": False}  # fmt: skip
        offline.send("generate", id="j1", job=job)
        result = until(offline, "j1", ENDS)[-1]
        assert result["type"] == "done", result
        started = time.monotonic()
        offline.send("fetch_model", id="f2", model="test/big")
        error = until(offline, "f2", ENDS)[-1]
        assert error["type"] == "error" and "test/big" in error["message"]
        assert "online access is off" in error["message"]
        assert time.monotonic() - started < 5.0
    finally:
        offline.close()
    assert len(hub.requests) == asked  # offline means offline


# --------------------------------------------------------------------------- in this process


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub allowed online in this process (the suite runs it offline)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def closed_port() -> int:
    """A loopback port nobody listens on (connections are refused at once)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_hub_fails_fast_naming_the_model(online: None, tmp_path: Path) -> None:
    from backend.models.hub import HubError, fetch_model

    started = time.monotonic()
    with pytest.raises(HubError, match=r"'owner/sd'.*out of reach"):
        fetch_model("owner/sd", cache_dir=tmp_path, endpoint=f"http://127.0.0.1:{closed_port()}")
    assert time.monotonic() - started < 15.0


def test_an_unreachable_hub_falls_back_to_the_cached_model(
    online: None, hub: FakeHub, tmp_path: Path
) -> None:
    from backend.models.hub import fetch_model

    first = fetch_model("test/tiny", cache_dir=tmp_path, endpoint=hub.url)
    asked = len(hub.requests)
    again = fetch_model("test/tiny", cache_dir=tmp_path, endpoint=hub.url)
    assert again == first and len(hub.requests) == asked + 1  # the listing only: all cached
    gone = fetch_model(
        "test/tiny", cache_dir=tmp_path, endpoint=f"http://127.0.0.1:{closed_port()}"
    )
    assert gone == first


def test_a_missing_repo_says_so(online: None, hub: FakeHub, tmp_path: Path) -> None:
    from backend.models.hub import HubError, fetch_model

    with pytest.raises(HubError, match=r"'owner/missing' is not on the Hugging Face Hub"):
        fetch_model("owner/missing", cache_dir=tmp_path, endpoint=hub.url)


def test_a_failing_file_names_the_model_and_the_file(
    online: None, hub: FakeHub, tmp_path: Path
) -> None:
    from backend.models.hub import HubError, fetch_model

    hub.broken.add("unet/diffusion_pytorch_model.safetensors")
    with pytest.raises(HubError, match=r"'test/tiny' failed at unet/diffusion_pytorch_model"):
        fetch_model("test/tiny", cache_dir=tmp_path, endpoint=hub.url)
    assert not list(tmp_path.glob("*/snapshots/*/unet/diffusion_pytorch_model.safetensors"))


def test_the_cli_line_names_model_file_megabytes_and_rate() -> None:
    from backend.models.hub import DownloadProgress

    state = DownloadProgress("owner/sd", "unet/w.safetensors", 1_500_000, 24_000_000, 6e6, 3, 9)
    assert state.describe() == (
        "downloading owner/sd (unet/w.safetensors): 1.5 of 24.0 MB at 6.0 MB/s"
    )
    state.bytes_done, state.file = state.bytes_total, ""
    assert state.describe() == "downloading owner/sd: 24.0 of 24.0 MB"


def test_the_cli_shows_the_download_then_generates(
    backend_env: dict[str, str], hub: FakeHub, tmp_path: Path
) -> None:
    import subprocess
    import sys

    env = dict(backend_env, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_CACHE=str(tmp_path))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "backend", "generate", "--model", "test/tiny", "--prompt", "a cat",
         "--frames", "2", "--width", "64", "--height", "64", "--steps", "2", "--no-mp4",
         "--device", "cpu", "--out", str(out)],
        cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    total = sum(len(b) for b in hub.repos["test/tiny"].values()) / 1e6
    assert f"downloading test/tiny: {total:.1f} of {total:.1f} MB\x1b[K\n" in result.stderr
    assert (out / "frame_00002.png").is_file()


# --------------------------------------------------------------------------- adapters


@pytest.mark.parametrize(
    ("files", "kind", "allow_pickle", "chosen"),
    [
        # diffusers' name wins over other files; training state is never a candidate
        (["README.md", "style.safetensors", "pytorch_lora_weights.safetensors",
          "checkpoint-500/pytorch_lora_weights.safetensors"], "lora", False,
         "pytorch_lora_weights.safetensors"),
        (["checkpoint-500/model.safetensors", "scheduler.safetensors", "optimizer.safetensors",
          "my-style.safetensors"], "lora", False, "my-style.safetensors"),
        (["sub/pytorch_lora_weights.safetensors", "other.safetensors"], "lora", False,
         "sub/pytorch_lora_weights.safetensors"),
        (["learned_embeds.safetensors", "pytorch_lora_weights.safetensors"], "embedding",
         False, "learned_embeds.safetensors"),
        (["token.safetensors", "image.png"], "embedding", False, "token.safetensors"),
        # pickles only when allowed, and only without a .safetensors
        (["learned_embeds.bin", "other.pt"], "embedding", True, "learned_embeds.bin"),
        (["lora.bin", "lora.safetensors"], "lora", True, "lora.safetensors"),
    ],
)  # fmt: skip
def test_an_adapter_repo_gives_its_one_weight_file_as_diffusers_would_guess(
    files: list[str], kind: str, allow_pickle: bool, chosen: str
) -> None:
    from backend.models.hub import adapter_weight

    assert adapter_weight(files, kind, "owner/x", allow_pickle) == chosen


@pytest.mark.parametrize(
    ("files", "allow_pickle", "message"),
    [
        (["a.safetensors", "b.safetensors"], False,
         r"LoRA 'owner/x' has 2 weight files \(a.safetensors, b.safetensors\) and none is "
         r"named pytorch_lora_weights.safetensors: cannot tell which to load; name the one "
         r"you want as owner/x/<file>, e.g. 'owner/x/a.safetensors' \(--lora, "),
        (["a.bin", "b.bin"], True, r"LoRA 'owner/x' has 2 weight files \(a.bin, b.bin\)"),
        (["README.md", "config.json"], False,
         r"^LoRA 'owner/x' has no .safetensors weights to load$"),
        (["lora.ckpt"], False, r"'owner/x' has no .safetensors weights.*lora.ckpt.*allow-pickle"),
        (["checkpoint-10/pytorch_lora_weights.safetensors"], False, r"'owner/x' has no"),
    ],
)  # fmt: skip
def test_an_adapter_repo_without_exactly_one_weight_file_names_the_repo(
    files: list[str], allow_pickle: bool, message: str
) -> None:
    from backend.models.hub import HubError, adapter_weight

    with pytest.raises(HubError, match=message):
        adapter_weight(files, "lora", "owner/x", allow_pickle)


def test_fetch_adapter_downloads_only_the_weight_file_and_finds_it_offline(
    online: None, hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    from backend.models.hub import DownloadHooks, HubError, fetch_adapter

    weights = os.urandom(3 * MB)
    hub.repos["test/emb"] = {"learned_embeds.safetensors": weights, "README.md": b"# hi"}
    hub.repos["test/other"] = {"learned_embeds.safetensors": weights}
    reports: list[Any] = []
    path = fetch_adapter(
        "test/emb", "embedding", hooks=DownloadHooks(reports.append), cache_dir=tmp_path,
        endpoint=hub.url,
    )  # fmt: skip
    assert path.name == "learned_embeds.safetensors" and path.read_bytes() == weights
    assert [r.file for r in reports] == ["learned_embeds.safetensors", ""]
    assert (reports[-1].bytes_done, reports[-1].bytes_total) == (len(weights), len(weights))
    assert not any("README" in path for _, path, _ in hub.requests)

    asked = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert fetch_adapter("test/emb", "embedding", cache_dir=tmp_path, endpoint=hub.url) == path
    with pytest.raises(
        HubError, match=r"embedding 'test/other' is not downloaded.*online access is off"
    ):
        fetch_adapter("test/other", "embedding", cache_dir=tmp_path, endpoint=hub.url)
    assert len(hub.requests) == asked


def test_fetch_adapter_cancel_leaves_no_file_and_an_unreachable_hub_says_so(
    online: None, hub: FakeHub, tmp_path: Path
) -> None:
    from backend.models.hub import DownloadCancelled, DownloadHooks, HubError, fetch_adapter

    hub.repos["test/lora"] = {"pytorch_lora_weights.safetensors": os.urandom(4 * MB)}
    hub.rate = 4 * MB
    reports: list[Any] = []
    hooks = DownloadHooks(reports.append, lambda: any(r.bytes_done > 0 for r in reports))
    with pytest.raises(DownloadCancelled, match="test/lora"):
        fetch_adapter("test/lora", "lora", hooks=hooks, cache_dir=tmp_path, endpoint=hub.url)
    assert hub.bytes_sent < 4 * MB
    assert not list(tmp_path.glob("*/snapshots/*/pytorch_lora_weights.safetensors"))
    with pytest.raises(HubError, match=r"cannot download LoRA 'test/lora'.*out of reach"):
        fetch_adapter(
            "test/lora", "lora", cache_dir=tmp_path, endpoint=f"http://127.0.0.1:{closed_port()}"
        )


# --------------------------------------------------------------------------- one file of a repo


@pytest.mark.parametrize(
    ("name", "repo", "file"),
    [
        ("owner/name", "owner/name", ""),
        ("owner/name/model.safetensors", "owner/name", "model.safetensors"),
        ("Own_er/na.me-2/sub dir/v1.SAFETENSORS", "Own_er/na.me-2", "sub dir/v1.SAFETENSORS"),
        ("owner/name/old.ckpt", "owner/name", "old.ckpt"),  # refused when fetched, unless allowed
    ],
)
def test_a_hub_id_names_a_repo_or_one_weight_file_of_it(name: str, repo: str, file: str) -> None:
    from backend.protocol import hub_id_problem, split_hub_id

    assert hub_id_problem(name) == ""
    assert split_hub_id(name) == (repo, file)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("owner/name/README.md", r"must be weights ending in \.safetensors .*got 'README\.md'$"),
        ("owner/name/unet", r"\.ckpt, \.bin, \.pt, \.pth\), got 'unet'$"),
        ("owner/name/../x.safetensors",
         r"'\.\./x\.safetensors' is not a file path inside hub repo 'owner/name'$"),
        ("owner/name/", r"'' is not a file path inside hub repo 'owner/name'$"),
        ("./x/y.safetensors", r"a hub id is owner/name, or owner/name/path/file\.safetensors "),
        ("/abs/x.safetensors", r"a hub id is owner/name"),
        ("C:/models/x.safetensors", r"a hub id is owner/name"),
        ("builtin:tiny", r"a hub id is owner/name"),
        ("x.safetensors", r"a hub id is owner/name"),
        ("owner--x/name", r"a hub id is owner/name"),
    ],
)  # fmt: skip
def test_anything_else_is_no_hub_id_and_the_error_names_it(name: str, reason: str) -> None:
    from backend.protocol import hub_id_problem, split_hub_id

    assert re.search(reason, hub_id_problem(name))
    with pytest.raises(ValueError, match=reason) as info:
        split_hub_id(name)
    assert str(info.value).startswith(f"{name!r} is not a hub id: ")


@pytest.fixture
def community(hub: FakeHub) -> FakeHub:
    """``hub`` with test/community: a fine-tune shipped as checkpoint files, no diffusers
    layout (two .safetensors, one pickle, a README)."""
    hub.repos["test/community"] = {
        "README.md": b"# a fine-tune",
        "v1.safetensors": os.urandom(1000),
        "sub/v2.safetensors": os.urandom(2 * MB),
        "v2.ckpt": b"pickled",
    }
    return hub


def test_one_file_of_a_repo_downloads_alone_then_comes_from_the_cache(
    online: None, community: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    from backend.models.hub import DownloadHooks, HubError, fetch_model

    name = "test/community/sub/v2.safetensors"
    weights = community.repos["test/community"]["sub/v2.safetensors"]
    reports: list[Any] = []
    path = fetch_model(
        name, hooks=DownloadHooks(reports.append), cache_dir=tmp_path, endpoint=community.url
    )
    assert path.read_bytes() == weights and path.name == "v2.safetensors"
    assert community.files_sent() == [
        "test/community:sub/v2.safetensors"
    ]  # that file, nothing else
    assert {r.model for r in reports} == {"test/community"}
    assert [r.file for r in reports] == ["sub/v2.safetensors", ""]
    last = reports[-1]
    assert (last.bytes_done, last.bytes_total, last.files_done, last.files_total) == (
        len(weights), len(weights), 1, 1,
    )  # fmt: skip

    # Downloaded once: the next fetch asks for the listing only.
    asked = len(community.requests)
    assert fetch_model(name, cache_dir=tmp_path, endpoint=community.url) == path
    assert len(community.requests) == asked + 1

    # The Hub out of reach: the cached file, or an error naming the file id.
    closed = f"http://127.0.0.1:{closed_port()}"
    assert fetch_model(name, cache_dir=tmp_path, endpoint=closed) == path
    with pytest.raises(
        HubError, match=r"cannot download model 'test/community/v1.safetensors'.*out of reach"
    ):
        fetch_model("test/community/v1.safetensors", cache_dir=tmp_path, endpoint=closed)

    # Offline: the cached file without a request; another file of the repo is not there.
    asked = len(community.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert fetch_model(name, cache_dir=tmp_path, endpoint=community.url) == path
    with pytest.raises(
        HubError,
        match=r"model 'test/community/v1.safetensors' is not downloaded and online access is off",
    ):
        fetch_model("test/community/v1.safetensors", cache_dir=tmp_path, endpoint=community.url)
    assert len(community.requests) == asked


def test_one_file_cancelled_midway_leaves_no_file_and_downloads_again(
    online: None, community: FakeHub, tmp_path: Path
) -> None:
    from backend.models.hub import DownloadCancelled, DownloadHooks, fetch_model

    big = os.urandom(8 * MB)
    community.repos["test/community"]["big.safetensors"] = big
    community.rate = 4 * MB  # 2 s for the file
    reports: list[Any] = []
    hooks = DownloadHooks(reports.append, lambda: any(r.bytes_done > 0 for r in reports))
    with pytest.raises(DownloadCancelled, match="test/community"):
        fetch_model(
            "test/community/big.safetensors", hooks=hooks, cache_dir=tmp_path,
            endpoint=community.url,
        )  # fmt: skip
    assert community.bytes_sent < len(big)  # the transfer stopped
    assert not list(tmp_path.glob("*/snapshots/*/big.safetensors"))
    community.rate = None
    path = fetch_model("test/community/big.safetensors", cache_dir=tmp_path, endpoint=community.url)
    assert path.read_bytes() == big


def test_a_file_the_repo_lacks_or_a_pickle_is_refused_before_any_download(
    online: None, community: FakeHub, tmp_path: Path
) -> None:
    from backend.models.hub import HubError, fetch_adapter, fetch_model

    where = {"cache_dir": tmp_path, "endpoint": community.url}
    with pytest.raises(HubError) as info:
        fetch_model("test/community/v3.safetensors", **where)
    assert str(info.value) == (
        "model repo 'test/community' has no file 'v3.safetensors' (its weight files: "
        "sub/v2.safetensors, v1.safetensors, v2.ckpt)"
    )
    with pytest.raises(
        HubError, match=r"^LoRA repo 'test/community' has no file 'x/a.safetensors'"
    ):
        fetch_adapter("test/community/x/a.safetensors", "lora", **where)
    with pytest.raises(HubError, match=r"model 'test/gone' is not on the Hugging Face Hub"):
        fetch_model("test/gone/model.safetensors", **where)
    # A whole repo without a diffusers layout: nothing to load as a model, so nothing is
    # downloaded, and the error says how to name one of its checkpoints.
    with pytest.raises(HubError) as info:
        fetch_model("test/community", **where)
    assert str(info.value) == (
        "model 'test/community' is not a diffusers repo (no model_index.json or config.json); "
        "to load one checkpoint of it give test/community/<file>, e.g. "
        "'test/community/sub/v2.safetensors' (its weight files: sub/v2.safetensors, "
        "v1.safetensors, v2.ckpt)"
    )
    with pytest.raises(HubError, match=r"model config 'test/community/v1.safetensors' names one"):
        fetch_model("test/community/v1.safetensors", configs_only=True, **where)
    assert community.files_sent() == []

    # A pickle: refused without asking the Hub anything, saying how to allow it.
    asked = len(community.requests)
    for fetch in (fetch_model, lambda name, **kw: fetch_adapter(name, "embedding", **kw)):
        with pytest.raises(HubError) as info:
            fetch("test/community/v2.ckpt", **where)
        assert "'test/community/v2.ckpt' is a pickled checkpoint (.ckpt)" in str(info.value)
        assert "--allow-pickle (or turn on Allow Pickled Weights" in str(info.value)
    assert len(community.requests) == asked
    path = fetch_model("test/community/v2.ckpt", allow_pickle=True, **where)
    assert path.read_bytes() == b"pickled" and community.files_sent() == ["test/community:v2.ckpt"]


def test_the_worker_fetches_loras_and_embeddings_by_kind(
    backend_env: dict[str, str], hub: FakeHub, tmp_path: Path
) -> None:
    lora = os.urandom(MB)
    hub.repos["test/loras"] = {
        "README.md": b"# two styles",
        "style-a.safetensors": lora,
        "style-b.safetensors": os.urandom(1000),
    }
    hub.repos["test/emb"] = {"learned_embeds.safetensors": b"e" * 1000, "other.safetensors": b""}
    worker = hub_worker(
        backend_env, tmp_path, tmp_path / "hub", HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0"
    )
    try:
        worker.send("fetch_model", id="a", model="test/loras", kind="lora")
        error = until(worker, "a", ENDS)[-1]
        assert error["type"] == "error" and error["kind"] == "HubError"
        assert "name the one you want as test/loras/<file>, e.g. " in error["message"]

        worker.send("fetch_model", id="b", model="test/loras/style-a.safetensors", kind="lora")
        replies = until(worker, "b", ENDS)
        fetched = replies[-1]
        assert fetched["type"] == "fetched", fetched
        assert fetched["model"] == "test/loras/style-a.safetensors"
        assert Path(fetched["path"]).read_bytes() == lora
        downloads = [m for m in replies if m["type"] == "download"]
        assert {(m["model"], m["files_total"]) for m in downloads} == {("test/loras", 1)}
        assert downloads[-1]["bytes_done"] == downloads[-1]["bytes_total"] == len(lora)

        worker.send("fetch_model", id="c", model="test/emb", kind="embedding")
        fetched = until(worker, "c", ENDS)[-1]
        assert fetched["type"] == "fetched" and fetched["path"].endswith(
            "/learned_embeds.safetensors"
        )
        # The same repo as a model (the default kind) is no diffusers repo.
        worker.send("fetch_model", id="d", model="test/emb")
        error = until(worker, "d", ENDS)[-1]
        assert error["type"] == "error" and "is not a diffusers repo" in error["message"]
        worker.send("fetch_model", id="e", model="test/emb", kind="vae")
        error = until(worker, "e", ENDS)[-1]
        assert (error["kind"], error["message"]) == (
            "ValueError",
            "kind: must be one of model, controlnet, lora, embedding, got 'vae'",
        )
    finally:
        worker.close()
    assert hub.files_sent() == [
        "test/loras:style-a.safetensors",
        "test/emb:learned_embeds.safetensors",
    ]


# --------------------------------------------------------------------------- configs


@pytest.fixture(scope="module")
def ldm_checkpoint(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline as one original-format .safetensors file."""
    from ldm_export import export_ldm_checkpoint

    return export_ldm_checkpoint(
        tiny_models["tiny"], tmp_path_factory.mktemp("ldm") / "tiny-sd.safetensors"
    )


@pytest.fixture
def in_process(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeHub:
    """``hub`` as this process's Hub, online, with the hub cache in tmp_path/cache."""
    from fakehub import use_in_process

    use_in_process(hub, monkeypatch.setattr, tmp_path / "cache")
    return hub


def test_a_single_file_checkpoint_fetches_only_the_configs_of_its_hub_config(
    in_process: FakeHub, ldm_checkpoint: Path, tiny_base: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    from backend.models.hub import DownloadCancelled, DownloadHooks
    from backend.models.loading import ModelLoadError, load_base_model

    with pytest.raises(DownloadCancelled, match="test/tiny"):
        load_base_model(str(ldm_checkpoint), config="test/tiny",
                        download=DownloadHooks(should_cancel=lambda: True))  # fmt: skip
    reports: list[Any] = []
    loaded = load_base_model(
        str(ldm_checkpoint), config="test/tiny", download=DownloadHooks(reports.append)
    )
    for module in ("unet", "vae", "text_encoder"):
        want, got = getattr(tiny_base, module).state_dict(), getattr(loaded, module).state_dict()
        assert want.keys() == got.keys() and all(got[k].equal(v) for k, v in want.items())
    assert loaded.tokenizer("a cat").input_ids == tiny_base.tokenizer("a cat").input_ids
    fetched = {r.file for r in reports} - {""}
    configs = {n for n in in_process.repos["test/tiny"] if n.endswith((".json", ".txt"))}
    assert fetched == configs and {r.model for r in reports} == {"test/tiny"}
    assert not any(p.endswith(".safetensors") for _, p, _ in in_process.requests)

    # Offline: the cached configs, or an error naming the config and the checkpoint.
    asked = len(in_process.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    load_base_model(str(ldm_checkpoint), config="test/tiny")
    with pytest.raises(ModelLoadError) as info:
        load_base_model(str(ldm_checkpoint), config="test/other")
    text = str(info.value)
    assert str(ldm_checkpoint) in text and "model config 'test/other' is not downloaded" in text
    assert len(in_process.requests) == asked


def test_a_single_file_controlnet_fetches_its_hub_config_with_progress(
    in_process: FakeHub, tiny_models: dict[str, Path], tiny_controlnet: Any, tmp_path: Path
) -> None:
    import shutil

    from backend.models.hub import DownloadHooks
    from backend.models.loading import load_controlnet

    folder = tiny_models["tiny-controlnet"]
    in_process.repos["test/cn"] = repo_from_folder(folder)
    single = tmp_path / "my-controlnet.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", single)
    reports: list[Any] = []
    loaded = load_controlnet(str(single), config="test/cn", download=DownloadHooks(reports.append))
    want, got = tiny_controlnet.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(got[k].equal(v) for k, v in want.items())
    assert {r.file for r in reports} == {"config.json", ""}
    assert not any(p.endswith(".safetensors") for _, p, _ in in_process.requests)


def test_a_base_model_named_as_one_file_of_a_repo_loads_like_the_local_checkpoint(
    in_process: FakeHub, ldm_checkpoint: Path, tiny_base: Any, tiny_models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from huggingface_hub import constants

    from backend.models.hub import DownloadHooks
    from backend.models.loading import ModelLoadError, load_base_model

    in_process.repos["test/fine-tune"] = {
        "README.md": b"# one checkpoint",
        "tiny-sd.safetensors": ldm_checkpoint.read_bytes(),
        "tiny-sd.ckpt": b"pickled",
    }
    name, config = "test/fine-tune/tiny-sd.safetensors", str(tiny_models["tiny"])
    reports: list[Any] = []
    loaded = load_base_model(name, config=config, download=DownloadHooks(reports.append))
    for module in ("unet", "vae", "text_encoder"):
        want, got = getattr(tiny_base, module).state_dict(), getattr(loaded, module).state_dict()
        assert want.keys() == got.keys() and all(got[k].equal(v) for k, v in want.items())
    assert loaded.source == name
    assert in_process.files_sent() == ["test/fine-tune:tiny-sd.safetensors"]
    assert [r.file for r in reports] == ["tiny-sd.safetensors", ""]

    asked = len(in_process.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    load_base_model(name, config=config)  # from the cache
    with pytest.raises(ModelLoadError, match=r"'test/fine-tune/tiny-sd.ckpt' is a pickled"):
        load_base_model("test/fine-tune/tiny-sd.ckpt", config=config)
    with pytest.raises(ModelLoadError, match=r"model_config must be a diffusers folder or hub id"):
        load_base_model(str(ldm_checkpoint), config=name)
    assert len(in_process.requests) == asked


def test_a_controlnet_named_as_one_file_of_a_repo_loads_like_the_local_file(
    in_process: FakeHub, tiny_models: dict[str, Path], tiny_controlnet: Any
) -> None:
    from backend.models.loading import load_controlnet

    folder = tiny_models["tiny-controlnet"]
    in_process.repos["test/cn-files"] = {
        "canny.safetensors": (folder / "diffusion_pytorch_model.safetensors").read_bytes(),
        "depth.safetensors": os.urandom(1000),
    }
    loaded = load_controlnet("test/cn-files/canny.safetensors", config=str(folder))
    want, got = tiny_controlnet.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(got[k].equal(v) for k, v in want.items())
    assert in_process.files_sent() == ["test/cn-files:canny.safetensors"]


# --------------------------------------------------------------------------- a hostile cache

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_repo(cache: Path, repo: str, ref: str, files: dict[str, bytes]) -> Path:
    """A hub cache entry written by hand: refs/main holding ``ref`` and a snapshot of
    ``files`` under snapshots/COMMIT (blobs as the real cache keeps them)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(ref)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        path = folder / "snapshots" / COMMIT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(os.path.relpath(blob, path.parent))
    return folder


def test_a_cache_ref_leading_outside_the_cache_is_never_followed(tmp_path: Path) -> None:
    from backend.models.hub import HubError, fetch_adapter, fetch_model

    cache = tmp_path / "hub"
    outside = tmp_path / "outside"  # what ../../.. from a snapshot folder reaches
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (outside / "model_index.json").write_text("{}")
    (outside / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    cached_repo(cache, "owner/evil", "../../../outside", {"config.json": b"{}"})
    for fetch in (
        lambda: fetch_model("owner/evil", cache_dir=cache),
        lambda: fetch_adapter("owner/evil", "lora", cache_dir=cache),
        lambda: fetch_model("owner/evil/pytorch_lora_weights.safetensors", cache_dir=cache),
    ):
        with pytest.raises(HubError) as info:
            fetch()  # offline (the suite's setting): the cache or an error
        assert "owner/evil" in str(info.value) and str(outside) not in str(info.value)


def test_a_cache_snapshot_linked_outside_the_cache_is_refused_naming_it(tmp_path: Path) -> None:
    from backend.models.hub import HubError, fetch_model

    cache = tmp_path / "hub"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    folder = cached_repo(cache, "owner/evil", COMMIT, {})
    (folder / "snapshots").mkdir()
    (folder / "snapshots" / COMMIT).symlink_to(outside)
    with pytest.raises(HubError) as info:
        fetch_model("owner/evil", cache_dir=cache)
    assert "outside the hub cache" in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_remove_model_stays_inside_the_cache(tmp_path: Path) -> None:
    from backend.models.hub import remove_cached

    cache = tmp_path / "hub"
    elsewhere = tmp_path / "other-disk"
    elsewhere.mkdir()
    keep = elsewhere / "big.safetensors"
    keep.write_bytes(b"k" * 5000)
    folder = cached_repo(cache, "owner/mixed", COMMIT, {"config.json": b"{}"})
    (folder / "blobs" / "linked").symlink_to(keep)  # a blob that is a link: not ours to free
    assert remove_cached("owner/mixed", cache_dir=cache) == 2  # the 2 bytes of "{}" only
    assert not folder.exists() and keep.read_bytes() == b"k" * 5000
    moved = elsewhere / "models--owner--moved"  # a model moved to another disk by hand
    (moved / "blobs").mkdir(parents=True)
    (moved / "blobs" / "weights").write_bytes(b"w" * 100)
    (cache / "models--owner--moved").symlink_to(moved)
    assert remove_cached("owner/moved", cache_dir=cache) == 0
    assert not (cache / "models--owner--moved").is_symlink()
    assert (moved / "blobs" / "weights").read_bytes() == b"w" * 100
