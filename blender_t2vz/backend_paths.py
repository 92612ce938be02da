"""Where the backend lives, and its stdlib-only job protocol, loaded by file path.

No bpy here. Two layouts are supported:

* the repository: ``blender_t2vz/`` sits beside ``backend/`` and ``install_deps.py``;
* the built extension: the add-on's modules are at the zip's root, with ``backend/`` and
  ``install_deps.py`` inside it.

The backend root is the folder that CONTAINS ``backend/``: the worker runs with it as the
working directory (``python -m backend serve``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

# The protocol module's name: a private submodule of the add-on's own package (e.g.
# ``bl_ext.user_default.blender_t2vz._backend_protocol``), never a top-level name, so two
# installed copies of the extension, or the backend's own ``backend.protocol`` in the same
# process, never see each other's module. It leaves sys.modules on unregister.
PROTOCOL_MODULE_NAME = f"{__package__ or 'blender_t2vz'}._backend_protocol"

_protocol: ModuleType | None = None


class BackendNotFoundError(RuntimeError):
    """The backend/ package is not where the add-on expects it."""


def addon_dir() -> Path:
    """The folder holding the add-on's modules."""
    return Path(__file__).resolve().parent


def backend_root() -> Path:
    """The folder that contains ``backend/`` (the extension root or the repository root)."""
    here = addon_dir()
    for candidate in (here, here.parent):
        if (candidate / "backend" / "protocol.py").is_file():
            return candidate
    raise BackendNotFoundError(
        f"backend/protocol.py not found in {here} or {here.parent}; "
        "reinstall the extension from a complete build"
    )


def load_protocol() -> ModuleType:
    """The backend's ``protocol`` module (stdlib only), executed from its file once."""
    global _protocol
    if _protocol is None:
        _protocol = load_module_from_file(backend_root() / "backend" / "protocol.py")
    return _protocol


def load_module_from_file(path: Path, name: str = PROTOCOL_MODULE_NAME) -> ModuleType:
    """Execute the Python file ``path`` as the module ``name`` (a submodule of the add-on)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BackendNotFoundError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while its classes are built.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def forget_protocol() -> None:
    """Drop the loaded protocol (unregister): a re-enabled add-on reads the file again."""
    global _protocol
    if _protocol is not None and sys.modules.get(_protocol.__name__) is _protocol:
        del sys.modules[_protocol.__name__]
    _protocol = None


def install_script() -> Path:
    """``install_deps.py``, which creates the backend's environment."""
    return backend_root() / "install_deps.py"


def venv_python(venv: str | os.PathLike[str]) -> Path:
    """The python executable inside a virtual environment folder."""
    venv = Path(venv)
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def default_venv(user_dir: str | os.PathLike[str] | None) -> Path:
    """Where the install button puts the environment: the extension's user folder if known."""
    if user_dir:
        return Path(user_dir) / ".venv"
    return backend_root() / ".venv"


def find_python(configured: str, user_dir: str | os.PathLike[str] | None) -> Path | None:
    """The backend python: the configured path, else the first existing default venv python.

    A configured path is returned even when missing so the caller can name it in its error.
    """
    if configured.strip():
        return Path(os.path.expanduser(configured.strip()))
    candidates = []
    if user_dir:
        candidates.append(venv_python(Path(user_dir) / ".venv"))
    with contextlib.suppress(BackendNotFoundError):
        candidates.append(venv_python(backend_root() / ".venv"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None
