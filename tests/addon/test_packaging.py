"""Packaging: the manifest's platforms are the installer's, and the backend's protocol is
loaded as a private submodule of the add-on (no top-level name in sys.modules)."""

import sys
from pathlib import Path

import pytest
import tomllib
from conftest import ROOT

from blender_t2vz import backend_paths, presets


@pytest.fixture(scope="module")
def install_deps():
    sys.path.insert(0, str(ROOT))
    try:
        import install_deps
    finally:
        sys.path.remove(str(ROOT))
    return install_deps


def test_manifest_platforms_are_where_the_installer_works(install_deps) -> None:
    manifest = tomllib.loads((ROOT / "blender_manifest.toml").read_text(encoding="utf-8"))
    assert tuple(manifest["platforms"]) == install_deps.SUPPORTED_PLATFORMS
    assert manifest["blender_version_min"] == "4.2.0"


@pytest.mark.parametrize(
    ("system", "machine", "tag"),
    [
        ("Linux", "x86_64", "linux-x64"),
        ("Windows", "AMD64", "windows-x64"),
        ("Darwin", "arm64", "macos-arm64"),
        ("Darwin", "x86_64", "macos-x64"),  # Intel Macs: no PyTorch 2.13 wheels
        ("Linux", "aarch64", "linux-arm64"),
    ],
)
def test_platform_tags(install_deps, monkeypatch, system: str, machine: str, tag: str) -> None:
    monkeypatch.setattr(install_deps.platform, "system", lambda: system)
    monkeypatch.setattr(install_deps.platform, "machine", lambda: machine)
    assert install_deps.platform_tag() == tag
    assert (tag in install_deps.SUPPORTED_PLATFORMS) == (tag not in {"macos-x64", "linux-arm64"})


def test_protocol_is_a_private_submodule_of_the_addon(addon) -> None:
    protocol = backend_paths.load_protocol()
    package = backend_paths.__name__.rpartition(".")[0]
    assert protocol.__name__ == f"{package}._backend_protocol"
    names = [name for name, module in sys.modules.items() if module is protocol]
    assert names == [protocol.__name__]  # no top-level name, nothing else
    assert protocol.__file__ == str(backend_paths.backend_root() / "backend" / "protocol.py")
    assert protocol.validate_job({"prompt": "p", "out": "o"}).steps == 50

    backend_paths.forget_protocol()  # what unregister does
    assert protocol.__name__ not in sys.modules
    again = backend_paths.load_protocol()
    assert again is not protocol and again.__name__ == protocol.__name__
    assert sys.modules[again.__name__] is again


def test_a_second_copy_never_clashes(tmp_path: Path) -> None:
    copy = tmp_path / "protocol.py"
    copy.write_text("VALUE = 'copy'\n")
    other = backend_paths.load_module_from_file(copy, "other_addon._backend_protocol")
    try:
        assert other.VALUE == "copy"
        assert backend_paths.load_protocol() is not other
        assert not hasattr(backend_paths.load_protocol(), "VALUE")
    finally:
        sys.modules.pop("other_addon._backend_protocol", None)


def test_the_shipped_presets_are_in_the_extension_layout() -> None:
    assert presets.shipped_dir().parent.parent == backend_paths.addon_dir()
    assert (presets.shipped_dir() / "Preview.py").is_file()
