"""install_deps.py: which PyTorch build it picks and how it installs it (no pip is run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import install_deps


@pytest.fixture
def linux_with_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(install_deps.platform, "system", lambda: "Linux")
    monkeypatch.setattr(install_deps, "has_nvidia_gpu", lambda: True)


def test_auto_picks_cuda_with_an_nvidia_gpu_and_cpu_without(
    monkeypatch: pytest.MonkeyPatch, linux_with_gpu: None
) -> None:
    assert install_deps.choose_torch("auto") == "cuda"
    monkeypatch.setattr(install_deps, "has_nvidia_gpu", lambda: False)
    assert install_deps.choose_torch("auto") == "cpu"
    monkeypatch.setattr(install_deps.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(install_deps, "has_nvidia_gpu", lambda: True)
    assert install_deps.choose_torch("auto") == "cpu"  # macOS: PyPI's build has MPS
    assert install_deps.choose_torch("cuda") == "cuda"  # an explicit choice is kept


def test_cpu_build_comes_from_pytorch_cpu_index_when_reachable(
    monkeypatch: pytest.MonkeyPatch, linux_with_gpu: None
) -> None:
    monkeypatch.setattr(install_deps, "reachable", lambda url: True)
    cmd = install_deps.torch_install_command(Path("py"), "cpu", "2.13.0")
    assert cmd[:4] == ["py", "-m", "pip", "install"] and "torch==2.13.0" in cmd
    assert cmd[cmd.index("--index-url") + 1] == install_deps.TORCH_CPU_INDEX
    assert "--no-deps" in cmd  # torch's dependencies come from the usual index


def test_unreachable_index_falls_back_to_the_configured_one(
    monkeypatch: pytest.MonkeyPatch, linux_with_gpu: None
) -> None:
    monkeypatch.setattr(install_deps, "reachable", lambda url: False)
    cmd = install_deps.torch_install_command(Path("py"), "cpu", "2.13.0")
    assert "--index-url" not in cmd and cmd[-1] == "torch==2.13.0"


def test_cuda_on_linux_uses_pypi_and_on_windows_the_cuda_index(
    monkeypatch: pytest.MonkeyPatch, linux_with_gpu: None
) -> None:
    monkeypatch.setattr(install_deps, "reachable", lambda url: True)
    assert "--index-url" not in install_deps.torch_install_command(Path("py"), "cuda", "2.13.0")
    monkeypatch.setattr(install_deps.platform, "system", lambda: "Windows")
    cmd = install_deps.torch_install_command(Path("py"), "cuda", "2.13.0")
    assert cmd[cmd.index("--index-url") + 1] == install_deps.TORCH_CUDA_INDEX


def test_an_installed_torch_that_fits_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[list[str]] = []
    monkeypatch.setattr(install_deps, "run", lambda cmd, **kw: ran.append(cmd))
    monkeypatch.setattr(install_deps, "choose_torch", lambda flavour: "cpu")
    monkeypatch.setattr(install_deps, "installed_torch", lambda python: ((2, 13), False))
    install_deps.ensure_torch(Path("py"), "cpu", "2.13.0")
    assert ran == []
    # A CPU-only torch does not satisfy a CUDA request, and an old torch satisfies nothing.
    monkeypatch.setattr(install_deps, "choose_torch", lambda flavour: "cuda")
    monkeypatch.setattr(install_deps, "reachable", lambda url: False)
    install_deps.ensure_torch(Path("py"), "cuda", "2.13.0")
    monkeypatch.setattr(install_deps, "installed_torch", lambda python: ((1, 13), True))
    install_deps.ensure_torch(Path("py"), "cuda", "2.13.0")
    assert len(ran) == 2 and all("torch==2.13.0" in cmd for cmd in ran)


def test_installed_torch_reads_this_interpreter() -> None:
    import torch

    found = install_deps.installed_torch(Path(sys.executable))
    assert found is not None
    major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    assert found == ((major, minor), torch.version.cuda is not None)


def test_help_describes_the_options() -> None:
    out = subprocess.run(
        [sys.executable, str(Path(install_deps.__file__)), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in ("--venv", "--torch", "--dev", "--demo", "--run-tests"):
        assert flag in out
