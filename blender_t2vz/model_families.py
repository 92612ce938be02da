"""The families of a job's models as the add-on can tell them, and the ControlNets it offers.

No bpy and no torch here. A model's family (``sd1``, ``sd2``, ``sdxl``) comes from, in
order: the built-in models' fixed architecture (``sizing.BUILTIN_FAMILIES``); a local
diffusers folder's configs or a local .safetensors file's tensor names (the protocol's
``family_of_path``, which reads the JSON header only); the protocol's table of known hub
ids (``KNOWN_CONTROLNETS``, ``KNOWN_MODELS``). Anything else is unknown: offered, but
marked, and the backend reads its family once it is on disk and refuses a ControlNet of
another family than the base before anything loads.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import backend_paths, sizing

# Control kinds for people (a detector's or a scene pass's; "union": one model for all).
KIND_LABELS = {
    "canny": "Canny",
    "openpose": "OpenPose",
    "depth": "Depth",
    "hed": "HED",
    "lineart": "Lineart",
    "mlsd": "MLSD",
    "union": "Union",
}


def _protocol():
    return backend_paths.load_protocol()


@functools.lru_cache(maxsize=64)
def _file_family(path: str, mtime_ns: int, size: int) -> str | None:
    """The family of a local .safetensors file, cached while the file stays the same (the
    panel asks at every redraw; an SDXL header is ~0.3 MB of JSON)."""
    return _protocol().family_of_path(path)


def model_family(name: str) -> str | None:
    """The family key of a base model or ControlNet (built-in, local, or a known hub id),
    or None when nothing tells it."""
    name = (name or "").strip()
    if not name:
        return None
    for prefix, family in sizing.BUILTIN_FAMILIES:
        if name.startswith(prefix):
            return family
    path = Path(os.path.expanduser(name))
    try:
        if path.is_file():
            stat = path.stat()
            return _file_family(str(path), stat.st_mtime_ns, stat.st_size)
        if path.is_dir():
            return _protocol().family_of_path(path)
    except OSError:
        return None
    return _protocol().known_family(name)


# The native side of an SD 2.x model that predicts epsilon (2-1-base; FAMILY_SIDES["sd2"]
# is its 768 px v-prediction sibling's).
SD2_EPSILON_SIDE = 512


def native_side(model: str, prediction_type: str | None = None) -> int:
    """``sizing.native_side`` of ``model``, but 512 for an SD 2.x single file that runs as
    an epsilon model (the job's ``prediction_type``, else its metadata's word), as the
    backend then loads it with 2-1-base's configs."""
    side = sizing.native_side(model)
    path = Path(os.path.expanduser((model or "").strip()))
    if side != _protocol().FAMILY_SIDES["sd2"] or not path.is_file():
        return side
    if model_family(str(path)) != "sd2":
        return side
    if prediction_type is None:
        hint = _protocol().file_prediction_type(path)
        prediction_type = None if hint is None else hint[0]
    return SD2_EPSILON_SIDE if prediction_type == "epsilon" else side


def label(family: str | None) -> str:
    """A family for people ("SDXL"); "unknown family" for None."""
    return "unknown family" if family is None else _protocol().FAMILY_LABELS[family]


def kind_of(entry: dict) -> str:
    """The control kind of a ControlNet entry's values: a scene pass's, else its detector's."""
    return str(entry.get("model_kind") or entry.get("detector") or "none")


def default_controlnet(family: str | None, kind: str) -> str | None:
    """The family's own ControlNet for control ``kind`` (no detector: canny's), or None."""
    if family is None:
        return None
    by_kind = _protocol().DEFAULT_CONTROLNETS.get(family, {})
    return by_kind.get("canny" if kind == "none" else kind)


def is_pickled(name: str) -> bool:
    """True for a known hub ControlNet whose repo holds only pickled weights."""
    known = _protocol().KNOWN_CONTROLNETS.get((name or "").strip())
    return known is not None and known.pickled


def is_union(name: str) -> bool:
    """True for a union ControlNet (one model, a control type per input): a known hub id,
    the built-in tiny one, or a local folder whose config names ControlNetUnionModel."""
    name = (name or "").strip()
    known = _protocol().KNOWN_CONTROLNETS.get(name)
    if known is not None:
        return known.kind == "union"
    if name.startswith("builtin:"):
        return name == "builtin:tiny-xl-union"
    config = Path(os.path.expanduser(name)) / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("_class_name") == "ControlNetUnionModel"


def control_type(model: str, kind: str) -> str | None:
    """The ``control_type`` a union ControlNet needs for control ``kind``; None for a plain
    ControlNet or a kind the union numbering lacks (the backend names the choices)."""
    if not is_union(model):
        return None
    return kind if kind in _protocol().UNION_CONTROL_TYPES else None


def mismatch(
    model: str,
    family: str | None,
    base: str,
    base_family: str | None,
    index: int | None = None,
) -> str:
    """Why ControlNet ``model`` (the job's ``index``-th, when given) cannot run on the base
    model, naming both models and families; "" when the families match or either cannot be
    told."""
    if family is None or base_family is None or family == base_family:
        return ""
    subject = "ControlNet" if index is None else f"ControlNet {index + 1}"
    return (
        f"{subject} {model!r} is an {label(family)} ControlNet, but the base model {base!r} "
        f"is {label(base_family)}: pick an {label(base_family)} ControlNet"
    )


@dataclass(frozen=True)
class Offer:
    """A ControlNet the panel offers for an entry, with the text its menu item shows."""

    model: str
    family: str | None
    text: str
    pickled: bool = False


def _known_text(model: str, entry: object, show_family: bool) -> str:
    """A known ControlNet's menu text: "[SDXL ]Canny: owner/name[ (pickled weights)]"."""
    family_text = f"{label(entry.family)} " if show_family else ""
    pickled = " (pickled weights)" if entry.pickled else ""
    return f"{family_text}{KIND_LABELS.get(entry.kind, entry.kind)}: {model}{pickled}"


def offered_controlnets(base_family: str | None, kind: str, own: Iterable[str] = ()) -> list[Offer]:
    """The ControlNets offered for an entry of control ``kind`` on a base of
    ``base_family``: the known hub ids of that family (of every family, each marked with
    it, when the base's is unknown), those for the entry's kind (and union models) first;
    then ``own`` models (the preferences', local folders and files) of the base's family,
    or whose family cannot be told (marked so)."""
    wanted = "canny" if kind == "none" else kind
    known = [
        (model, entry)
        for model, entry in _protocol().KNOWN_CONTROLNETS.items()
        if base_family is None or entry.family == base_family
    ]
    known.sort(key=lambda item: item[1].kind not in (wanted, "union"))  # stable: table order
    offers = [
        Offer(model, entry.family, _known_text(model, entry, base_family is None), entry.pickled)
        for model, entry in known
    ]
    seen = {offer.model for offer in offers}
    for name in own:
        name = (name or "").strip()
        if not name or name in seen:
            continue
        seen.add(name)
        family = model_family(name)
        if base_family is not None and family not in (None, base_family):
            continue
        mark = f" ({label(family)})" if family is not None else " (family unknown)"
        offers.append(Offer(name, family, f"{name}{mark}"))
    return offers
