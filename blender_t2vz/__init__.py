"""Text2Video-Zero in Blender's Video Sequence Editor.

The add-on never imports torch, diffusers or cv2: generation runs in a separate backend
process (``python -m backend serve``) started from the backend's own environment.
"""

import importlib

from . import backend_paths, operators, panels, preferences, presets, properties, runtime

_modules = [properties, preferences, operators, presets, panels]
# Optional modules that register their own classes when present (issue 4: scene control).
_OPTIONAL = ("scene_control",)
_registered: list = []


def _optional_modules() -> list:
    found = []
    for name in _OPTIONAL:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ImportError:
            continue
        if hasattr(module, "register") and hasattr(module, "unregister"):
            found.append(module)
    return found


def register() -> None:
    """Register every class, property and module of the add-on."""
    for module in [*_modules, *_optional_modules()]:
        module.register()
        _registered.append(module)
    runtime.register()


def unregister() -> None:
    """Stop the worker and the timer, then unregister in reverse order."""
    runtime.unregister()
    while _registered:
        _registered.pop().unregister()
    backend_paths.forget_protocol()
