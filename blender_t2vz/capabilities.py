"""What the backend environment can do, learnt without importing it into Blender.

No bpy here. A short subprocess of the backend's python looks the detectors' modules up
with ``importlib.util.find_spec`` (nothing is imported, so no torch start-up: a fraction of
a second) and prints JSON. The answer is cached per backend python and forgotten when the
installer has run, so the panel can ask on every redraw.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from . import backend_paths

PROBE_TIMEOUT = 20.0
INSTALL_HINT = (
    "Run Install Backend again in the add-on's preferences (it installs scipy for OpenPose); "
    "for HED, Lineart and MLSD tick 'Detectors' next to it (controlnet-aux and a torchvision "
    "matching torch in the backend environment)"
)
# Why a controlnet-aux detector is refused while pickled weights are not allowed.
PICKLE_HINT = (
    "comes from controlnet-aux, whose weights are pickled .pth files (loading them can run "
    "arbitrary code): turn on Allow Pickled Weights in the add-on's preferences if you trust "
    "lllyasviel/Annotators, or use Canny, OpenPose or Depth (safetensors)"
)

_cache: dict[str, dict[str, bool]] = {}


class ProbeError(RuntimeError):
    """The backend python could not be asked (missing, broken, or too slow)."""


def probe_code(modules: Iterable[str]) -> str:
    """Python source printing {module: found} as JSON, importing none of them."""
    names = sorted(set(modules))
    return (
        "import importlib.util, json\n"
        f"names = {names!r}\n"
        "print(json.dumps({n: importlib.util.find_spec(n) is not None for n in names}))\n"
    )


def probe_modules(
    python: str | os.PathLike[str],
    modules: Iterable[str],
    env: Mapping[str, str] | None = None,
    timeout: float = PROBE_TIMEOUT,
) -> dict[str, bool]:
    """{module: found} in the environment of ``python``, run as the worker runs."""
    try:
        result = subprocess.run(
            [str(python), "-c", probe_code(modules)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(backend_paths.backend_root()),
            env={**os.environ, **(env or {})},
        )
    except (OSError, subprocess.TimeoutExpired, backend_paths.BackendNotFoundError) as exc:
        raise ProbeError(f"could not run {python}: {exc}") from exc
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ProbeError(f"{python} failed ({result.returncode}): {tail}")
    try:
        found = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise ProbeError(f"{python} printed no answer: {result.stdout[-200:]!r}") from exc
    return {name: bool(found.get(name)) for name in modules}


def detector_modules() -> dict[str, tuple[str, ...]]:
    """Modules each detector needs, from the backend's protocol (canny and none need none)."""
    return dict(getattr(backend_paths.load_protocol(), "DETECTOR_MODULES", {}))


def pickled_detectors() -> tuple[str, ...]:
    """Detectors that load pickled weights (controlnet-aux's), from the backend's protocol."""
    return tuple(getattr(backend_paths.load_protocol(), "AUX_DETECTORS", ()))


def detector_availability(
    python: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> dict[str, bool] | None:
    """{detector: usable} for the backend ``python`` (cached), None when it cannot be asked."""
    if python is None or not Path(python).is_file():
        return None
    key = str(python)
    if key not in _cache:
        needs = detector_modules()
        modules = {m for names in needs.values() for m in names}
        try:
            found = probe_modules(python, modules, env) if modules else {}
        except ProbeError:
            return None
        _cache[key] = {d: all(found.get(m, False) for m in names) for d, names in needs.items()}
    return _cache[key]


def missing_modules(detector: str, python: str | os.PathLike[str] | None) -> list[str]:
    """The modules ``detector`` lacks in the backend environment ([] when usable or unknown)."""
    available = detector_availability(python)
    if available is None or available.get(detector, True):
        return []
    return list(detector_modules().get(detector, ()))


def forget(python: str | os.PathLike[str] | None = None) -> None:
    """Drop cached answers (all, or one python's): after an install they may change."""
    if python is None:
        _cache.clear()
    else:
        _cache.pop(str(python), None)
