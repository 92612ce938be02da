"""install_deps.py: which PyTorch build it picks, the tested versions it installs (no pip is run)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

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


# --------------------------------------------------------------------------- tested versions


def backend_requirements() -> list[Requirement]:
    """The requirement lines of backend/requirements.txt."""
    text = install_deps.BACKEND_REQUIREMENTS.read_text(encoding="utf-8")
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    return [Requirement(line) for line in lines if line]


def test_every_requirement_is_pinned_at_its_tested_upper_bound() -> None:
    pins = install_deps.read_constraints()
    for req in backend_requirements():
        name = install_deps.normalized_name(req.name)
        assert name in pins, f"{req.name} has no tested version in constraints.txt"
        assert req.specifier.contains(pins[name]), (req, pins[name])
        uppers = [s.version for s in req.specifier if s.operator == "<="]
        assert uppers == [pins[name]], f"{req} should carry the tested {pins[name]} as <="
    assert not [n for n in pins if n.startswith(("torch", "nvidia-", "triton", "pip"))]


def test_constraints_are_the_versions_these_tests_run_with() -> None:
    installed = {
        install_deps.normalized_name(d.metadata["Name"]): d.version
        for d in importlib.metadata.distributions()
    }
    differ = {
        name: (pinned, installed[name])
        for name, pinned in install_deps.read_constraints().items()
        if name in installed and installed[name].split("+")[0] != pinned
    }
    assert not differ, f"(pinned, installed): regenerate with --write-constraints: {differ}"


def test_constraints_text_pins_exact_versions_without_torch_or_local_tags() -> None:
    text = install_deps.constraints_text(
        {"torch": "2.13.0+cpu", "nvidia-cudnn-cu12": "9.1", "pip": "26.3", "av": "18.1.0",
         "numpy": "1.26.4", "triton": "3.1"}
    )  # fmt: skip
    pins = [line for line in text.splitlines() if not line.startswith("#")]
    assert pins == ["av==18.1.0", "numpy==1.26.4"]


def fake_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **kwargs: bool) -> list[str]:
    """The pip command install_packages runs (nothing is installed)."""
    ran: list[list[str]] = []
    monkeypatch.setattr(install_deps, "run", lambda cmd, **kw: ran.append(cmd))
    monkeypatch.setattr(
        install_deps.subprocess,
        "run",
        lambda *a, **kw: subprocess.CompletedProcess(a, 0, stdout="2.5.1+cu121\n"),
    )
    install_deps.install_packages(tmp_path / "bin" / "python", dev=False, **kwargs)
    assert len(ran) == 1
    return ran[0]


def test_install_uses_the_tested_versions_and_keeps_the_chosen_torch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "bin").mkdir()
    cmd = fake_install(monkeypatch, tmp_path)
    constraints = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-c"]
    assert str(install_deps.BACKEND_CONSTRAINTS) in constraints
    torch_pin = Path(next(c for c in constraints if c != str(install_deps.BACKEND_CONSTRAINTS)))
    assert torch_pin.read_text().strip() == "torch==2.5.1+cu121"  # the installed build stays
    assert cmd[cmd.index("-r") + 1] == str(install_deps.BACKEND_REQUIREMENTS)
    unpinned = fake_install(monkeypatch, tmp_path, pinned=False)
    assert str(install_deps.BACKEND_CONSTRAINTS) not in unpinned and "-c" in unpinned


def test_write_constraints_reads_an_environment() -> None:
    versions = install_deps.installed_versions(Path(sys.executable))
    assert versions["pytest"] == importlib.metadata.version("pytest")
    assert "huggingface-hub" in versions  # names are normalized as pip compares them


@pytest.mark.parametrize(
    ("torch_version", "vision", "index"),
    [
        ("2.13.0+cpu", "0.28.0", install_deps.TORCH_CPU_INDEX),
        ("2.5.1+cu121", "0.20.1", "https://download.pytorch.org/whl/cu121"),
        ("2.8.0+cu128", "0.23.0", install_deps.TORCH_CUDA_INDEX),
        ("2.6.0", "0.21.0", None),  # PyPI's build: torchvision from PyPI too
    ],
)
def test_detectors_get_the_torchvision_of_the_installed_torch(
    monkeypatch: pytest.MonkeyPatch, torch_version: str, vision: str, index: str | None
) -> None:
    monkeypatch.setattr(install_deps, "reachable", lambda url: True)
    pins = [Path("env/bin/t2vz-constraints.txt"), Path("backend/constraints.txt")]
    first, second = install_deps.detectors_install_commands(Path("py"), torch_version, pins)
    assert first[:5] == ["py", "-m", "pip", "install", f"torchvision=={vision}"]
    if index is None:
        assert "--index-url" not in first and "--no-deps" not in first
    else:
        assert first[first.index("--index-url") + 1] == index and "--no-deps" in first
    assert second[:5] == ["py", "-m", "pip", "install", "controlnet-aux"]
    for cmd in (first, second):  # torch stays the installed build in both steps
        assert [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-c"] == [str(p) for p in pins]
    with pytest.raises(ValueError, match="torch 1.13.1"):
        install_deps.torchvision_version("1.13.1")


def test_detectors_option_runs_the_detector_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple] = []
    monkeypatch.setattr(install_deps, "ensure_venv", lambda venv: tmp_path / "python")
    monkeypatch.setattr(install_deps, "ensure_torch", lambda *a: None)
    monkeypatch.setattr(install_deps, "install_packages", lambda *a, **k: calls.append("pkgs"))
    monkeypatch.setattr(
        install_deps, "install_detectors", lambda python, pinned: calls.append(("det", pinned))
    )
    assert install_deps.main(["--venv", str(tmp_path), "--detectors", "--unpinned"]) == 0
    assert calls == ["pkgs", ("det", False)]
    calls.clear()
    assert install_deps.main(["--venv", str(tmp_path)]) == 0
    assert calls == ["pkgs"]


def test_ray_comes_with_cluster_and_with_dev_and_is_pinned(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "bin").mkdir()
    assert install_deps.CLUSTER_REQUIREMENT not in fake_install(monkeypatch, tmp_path)
    assert install_deps.CLUSTER_REQUIREMENT in fake_install(monkeypatch, tmp_path, cluster=True)
    # The README's test command (--dev --run-tests) installs it, so the cluster tests run.
    ran: list[list[str]] = []
    monkeypatch.setattr(install_deps, "run", lambda cmd, **kw: ran.append(cmd))
    install_deps.install_packages(tmp_path / "bin" / "python", dev=True)
    assert install_deps.CLUSTER_REQUIREMENT in ran[0]
    pinned = install_deps.read_constraints()["ray"]
    assert Requirement(install_deps.CLUSTER_REQUIREMENT).specifier.contains(pinned)


def test_cluster_option_reaches_the_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(install_deps, "ensure_venv", lambda venv: tmp_path / "python")
    monkeypatch.setattr(install_deps, "ensure_torch", lambda *a: None)
    monkeypatch.setattr(
        install_deps, "install_packages", lambda *a, cluster=False, **k: calls.append(cluster)
    )
    assert install_deps.main(["--venv", str(tmp_path), "--cluster"]) == 0
    assert install_deps.main(["--venv", str(tmp_path)]) == 0
    assert calls == [True, False]
