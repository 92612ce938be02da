"""Shared fixtures of the backend tests.

The backend suite runs as ``pytest tests --ignore=tests/addon``; the add-on tests run in a
separate process (``pytest tests/addon``) with their own conftest, and this file is loaded
there too. So: no bpy and no torch at import time, every heavy fixture is lazy, and the
backend-only environment (the session model cache) is not forced on the add-on tests.

For everything: no network. Hugging Face libraries are put offline before they are
imported, sockets refuse non-local connections (``netblock``), and subprocesses started
with ``backend_env`` get the same block through a ``sitecustomize`` module.

Tiny Stable-Diffusion-shaped models are built once per session with
``backend.models.tiny.build_tiny`` into the session's T2VZ_CACHE_DIR (where ``builtin:tiny...``
names resolve, also in subprocesses) and loaded through the real loading code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # helpers (netblock, ldm_export) import as top-level modules
    sys.path.insert(0, str(TESTS))

import netblock  # noqa: E402

REPO = TESTS.parent
ADDON_TESTS = TESTS / "addon"

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}
# huggingface_hub reads these once, when it is first imported: set them before any test does.
os.environ.update(OFFLINE_ENV)


@pytest.fixture(scope="session", autouse=True)
def _block_network() -> Iterator[None]:
    """No test may reach the network: only loopback and Unix sockets connect."""
    with pytest.MonkeyPatch.context() as mp:
        netblock.install(mp.setattr)
        yield


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The T2VZ_CACHE_DIR of this test session (built-in models live here)."""
    return tmp_path_factory.mktemp("t2vz-cache")


@pytest.fixture(scope="session")
def _single_threaded_torch() -> None:
    """One intra-op thread: the tiny models gain nothing from more, and on a busy 2-core
    machine OpenMP threads that wait for each other make every model call ~10x slower."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _backend_test_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Backend tests never touch the user's model cache; add-on tests manage their own."""
    if ADDON_TESTS in Path(request.node.path).resolve().parents:
        return
    monkeypatch.setenv("T2VZ_CACHE_DIR", str(request.getfixturevalue("session_cache")))
    request.getfixturevalue("_single_threaded_torch")


@pytest.fixture(scope="session")
def tiny_models(session_cache: Path, _single_threaded_torch: None) -> dict[str, Path]:
    """Folders of the three tiny models, built once, where ``builtin:<kind>`` resolves."""
    from backend.models.tiny import TINY_KINDS, TINY_REVISION, build_tiny

    folders = {}
    for kind in TINY_KINDS:
        folder = session_cache / f"{kind}-r{TINY_REVISION}"
        if not folder.is_dir():
            build_tiny(kind, folder)
        folders[kind] = folder
    return folders


@pytest.fixture(scope="session")
def tiny_family_models(session_cache: Path, _single_threaded_torch: None) -> dict[str, Path]:
    """Folders of the tiny SDXL- and SD 2.x-shaped models (``builtin:tiny-xl`` ...), built
    once where their builtin names resolve."""
    from backend.models.tiny import TINY_FAMILY_KINDS, TINY_REVISION, build_tiny

    folders = {}
    for kind in TINY_FAMILY_KINDS:
        folder = session_cache / f"{kind}-r{TINY_REVISION}"
        if not folder.is_dir():
            build_tiny(kind, folder)
        folders[kind] = folder
    return folders


@pytest.fixture(scope="session")
def tiny_base(tiny_models: dict[str, Path]) -> Any:
    """The tiny text-to-image model, loaded from its folder by backend.models.loading."""
    from backend.models.loading import load_base_model

    return load_base_model(str(tiny_models["tiny"]))


@pytest.fixture(scope="session")
def tiny_pix2pix(tiny_models: dict[str, Path]) -> Any:
    """The tiny InstructPix2Pix model (8-channel UNet)."""
    from backend.models.loading import load_base_model

    return load_base_model(str(tiny_models["tiny-pix2pix"]), pix2pix=True)


@pytest.fixture(scope="session")
def tiny_controlnet(tiny_models: dict[str, Path]) -> Any:
    """The tiny ControlNet (random zero-convolutions, so control has an effect)."""
    from backend.models.loading import load_controlnet

    return load_controlnet(str(tiny_models["tiny-controlnet"]))


@pytest.fixture(scope="session")
def backend_env(session_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for backend subprocesses: offline, network blocked, the session cache."""
    site = tmp_path_factory.mktemp("netblock-site")
    (site / "sitecustomize.py").write_text(netblock.sitecustomize_source(), encoding="utf-8")
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["T2VZ_CACHE_DIR"] = str(session_cache)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"  # see _single_threaded_torch
    return env


@pytest.fixture(scope="session")
def run_backend(
    backend_env: dict[str, str], tiny_models: dict[str, Path]
) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``python -m backend ARGS`` in a subprocess (tiny models already built)."""

    def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "backend", *map(str, args)],
            cwd=REPO,
            env=backend_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def pickled_controlnet(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny ControlNet as a diffusers folder whose weights are only a pickled .bin."""
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("pickled-cn") / "cn"
    shutil.copytree(tiny_models["tiny-controlnet"], folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), folder / "diffusion_pytorch_model.bin")
    weights.unlink()
    return folder
