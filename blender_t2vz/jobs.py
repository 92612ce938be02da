"""Building jobs from plain values: the panel's settings, the inputs taken from strips.

No bpy here: everything arrives as plain Python values, and every job leaves through the
backend's own ``validate_job`` so the add-on can never send what the backend refuses.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import backend_paths, model_families
from .sizing import round_to_8, scene_size  # noqa: F401  (the job size helpers)

MODES = ("text2video", "controlnet", "pix2pix")

# Settings a regeneration takes from the panel; inputs (videos, mode, frames of a
# strip-driven job) stay as the result strip's job had them.
REGENERATE_FIELDS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance",
    "image_guidance",
    "width",
    "height",
    "fit",
    "chunk_size",
    "smooth_bg",
    "smooth_alpha",
    "device",
    "dtype",
    "write_mp4",
    "compile",
)


class JobBuildError(ValueError):
    """The panel's settings or inputs cannot make a job; the message says which value."""


def resolve_output_root(setting: str, blend_path: str, temp_dir: str | None = None) -> Path:
    """The folder results go to: ``//`` is beside the .blend, or the temp folder if unsaved."""
    setting = (setting or "//t2vz/").strip()
    if setting.startswith("//"):
        relative = setting[2:]
        if blend_path:
            base = Path(blend_path).parent
        else:
            base = Path(temp_dir or tempfile.gettempdir())
            if not relative.strip("/\\"):
                relative = "t2vz"
        return (base / relative).resolve()
    return Path(os.path.expanduser(setting)).resolve()


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of ``text`` (a prompt)."""
    cleaned = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return cleaned[:limit].rstrip("_") or "t2vz"


def unique_out_dir(
    root: str | os.PathLike[str], prompt: str, seed: int, taken: Collection[str] = ()
) -> Path:
    """A folder under ``root`` that does not exist yet, named after the prompt and seed;
    ``taken``: output folders of jobs running or queued (they do not exist yet either)."""
    root = Path(root)
    base = f"{slug(prompt)}_s{seed}"
    taken = {str(Path(t)) for t in taken}
    for n in range(1, 100_000):
        candidate = root / f"{base}_{n:03d}"
        if not candidate.exists() and str(candidate) not in taken:
            return candidate
    raise JobBuildError(f"output folder {root}: no free name for {base}")


def strip_name(prompt: str, limit: int = 60) -> str:
    """A strip name from the prompt (Blender names hold 63 bytes)."""
    name = " ".join(prompt.split()) or "T2VZ"
    encoded = name.encode("utf-8")[:limit]
    return encoded.decode("utf-8", errors="ignore")


def _model(settings: Mapping[str, Any], defaults: Mapping[str, Any], mode: str) -> str:
    model = str(settings.get("model") or "").strip()
    if model:
        return model
    key = "pix2pix_model" if mode == "pix2pix" else "model"
    model = str(defaults.get(key) or "").strip()
    if not model:
        raise JobBuildError(
            f"no base model set for mode {mode!r}: set one in the panel or preferences"
        )
    return model


# The controlnet-aux detectors: the preferences name no ControlNet for them, so an entry fed
# by one must name its model (the canny default would be the wrong one); the message names
# one of the base model's family (KNOWN_CONTROLNETS), else of SD 1.x.
AUX_DETECTORS = ("hed", "lineart", "mlsd")


def _aux_example(detector: str, family: str | None) -> str:
    """A known ControlNet for controlnet-aux ``detector`` of ``family`` (SD 1.x when it
    cannot be told), or a union one of that family; "" when the table has none."""
    known = backend_paths.load_protocol().KNOWN_CONTROLNETS
    for wanted in (detector, "union"):
        for model, entry in known.items():
            if entry.family == (family or "sd1") and entry.kind == wanted:
                return f", e.g. {model}"
    return ""


def _controlnet_model(
    entry: Mapping[str, Any],
    defaults: Mapping[str, Any],
    index: int,
    family: str | None = None,
) -> str:
    """The entry's model, else the preferences' for its kind, else ``family``'s own default.

    A preferences' model of another family than the base model's (``family``, when it can
    be told) gives way to the base family's default for the kind: the SD 1.5 ControlNets
    the preferences start with are never sent with an SDXL base.
    """
    model = str(entry.get("model") or "").strip()
    if model:
        return model
    by_detector = defaults.get("controlnet_models") or {}
    # Scene passes name their kind (depth, openpose, canny) apart from the backend detector.
    detector = model_families.kind_of(entry)
    if detector in AUX_DETECTORS and not by_detector.get(detector):
        raise JobBuildError(
            f"ControlNet {index + 1}: detector {detector!r} needs a ControlNet trained on its "
            f"images: set the Model{_aux_example(detector, family)}"
        )
    model = str(by_detector.get(detector) or by_detector.get("canny") or "").strip()
    own_family = model_families.model_family(model) if model else None
    if family is not None and (not model or own_family not in (None, family)):
        model = model_families.default_controlnet(family, detector) or model
    if not model:
        raise JobBuildError(
            f"ControlNet {index + 1}: no model set (detector {detector!r}); "
            "set one in the panel or preferences"
        )
    return model


def resolve_controlnet(
    entry: Mapping[str, Any], defaults: Mapping[str, Any], index: int, family: str | None
) -> str | None:
    """The model a ControlNet entry will use (``_controlnet_model``), or None when the job
    would be refused for it (the message comes at Generate)."""
    try:
        return _controlnet_model(entry, defaults, index, family)
    except JobBuildError:
        return None


def family_problem(base: str, models: Sequence[str | None]) -> str:
    """Why the job's ControlNets ``models`` (None: one whose model cannot be resolved)
    cannot run on base model ``base``: the first of another family, naming both models and
    families; "" when none is of another family (or their families cannot be told)."""
    base_family = model_families.model_family(base)
    for i, model in enumerate(models):
        if not model:
            continue
        family = model_families.model_family(model)
        problem = model_families.mismatch(model, family, base, base_family, i)
        if problem:
            return problem
    return ""


def _controlnet_fields(entry: Mapping[str, Any], model: str) -> dict[str, Any]:
    """A union ControlNet's ``control_type`` for the entry's kind (a scene pass sends no
    detector the backend could take it from); nothing for a plain ControlNet."""
    kind = model_families.control_type(model, model_families.kind_of(entry))
    return {} if kind is None else {"control_type": kind}


def adapter_fields(entries: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The job's ``loras`` and ``embeddings`` from the panel's list (kind, path, weight/token)."""
    loras: list[dict[str, Any]] = []
    embeddings: list[dict[str, Any]] = []
    for i, entry in enumerate(entries):
        kind = entry.get("kind", "lora")
        label = f"{'LoRA' if kind == 'lora' else 'Embedding'} {i + 1}"
        path = str(entry.get("path") or "").strip()
        if not path:
            raise JobBuildError(f"{label}: choose a .safetensors file or type a hub id")
        if kind == "lora":
            loras.append({"path": path, "weight": float(entry.get("weight", 1.0))})
            continue
        token = str(entry.get("token") or "").strip()
        if not token:
            raise JobBuildError(f"{label}: type the token that calls it in the prompt")
        embeddings.append({"path": path, "token": token})
    return {"loras": loras, "embeddings": embeddings}


def build_job(
    settings: Mapping[str, Any],
    *,
    out: str | os.PathLike[str],
    fps: float,
    defaults: Mapping[str, Any] | None = None,
    source_frames: int | None = None,
    video: Mapping[str, Any] | None = None,
    controls: Sequence[Mapping[str, Any]] = (),
    flow_source: str | None = None,
) -> dict[str, Any]:
    """A validated job dict from the panel's settings and the inputs found on the timeline.

    ``settings`` holds plain values (see ``properties.T2VZ_SceneSettings.to_values``):
    mode, prompt, negative_prompt, model, seed, steps, guidance, image_guidance, motion,
    frames, match_source, width, height, chunk_size, smooth_bg, smooth_alpha, device,
    dtype, write_mp4, ``controlnets`` (dicts with model, weight, detector) and ``adapters``
    (dicts with kind "lora" or "embedding", path, and weight or token).
    ``video`` is the pix2pix source and ``controls`` one VideoInput dict per ControlNet,
    both ``{"path", "start", "stride"}``; ``source_frames`` is how many frames they hold.
    ``flow_source`` is the folder of motion-vector frames rendered from the 3D scene for
    consistency "flow" (None: the backend estimates the motion from the input video).
    """
    protocol = backend_paths.load_protocol()
    defaults = defaults or {}
    mode = settings.get("mode", "text2video")
    if mode not in MODES:
        raise JobBuildError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
    prompt = str(settings.get("prompt", ""))
    if not prompt.strip() and mode != "pix2pix":
        raise JobBuildError("prompt: type a prompt first (got an empty one)")
    if mode == "pix2pix" and not prompt.strip():
        raise JobBuildError("prompt: type an editing instruction first (got an empty one)")

    frames = int(settings.get("frames", 8))
    if mode != "text2video":
        if source_frames is None or source_frames < 1:
            raise JobBuildError(f"{mode} needs a source strip with frames, got {source_frames}")
        if settings.get("match_source", True):
            frames = source_frames
        elif frames > source_frames:
            raise JobBuildError(
                f"frames: {frames} is longer than the source strip ({source_frames} frames); "
                "lower it or use 'Match Source Strip'"
            )

    job: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": str(settings.get("negative_prompt", "")),
        "out": str(out),
        "mode": mode,
        "model": _model(settings, defaults, mode),
        "frames": frames,
        "width": int(settings.get("width", 512)),
        "height": int(settings.get("height", 512)),
        "fit": str(settings.get("fit", "crop")),
        "steps": int(settings.get("steps", 50)),
        "guidance": float(settings.get("guidance", 7.5)),
        "seed": int(settings.get("seed", 0)),
        "chunk_size": int(settings.get("chunk_size", 8)),
        # pix2pix follows its moving source: the backend refuses smoothing there.
        "smooth_bg": bool(settings.get("smooth_bg", False)) and mode != "pix2pix",
        "smooth_alpha": float(settings.get("smooth_alpha", 0.6)),
        # Flow follows an input video's motion: not for text2video (the backend refuses it).
        "consistency": "paper"
        if mode == "text2video"
        else str(settings.get("consistency", "paper")),
        "device": str(settings.get("device", "auto")),
        "dtype": str(settings.get("dtype", "auto")),
        "fps": float(fps),
        "write_mp4": bool(settings.get("write_mp4", False)),
        "compile": bool(settings.get("compile", False)),
    }
    job.update(adapter_fields(settings.get("adapters", ())))
    if settings.get("prediction_type"):  # None: the model's own
        job["prediction_type"] = str(settings["prediction_type"])
    for side in ("width", "height"):
        if job[side] % 8:
            raise JobBuildError(f"{side}: must be a multiple of 8, got {job[side]}")
    if mode == "text2video":
        motion = settings.get("motion", protocol.DEFAULT_MOTION)
        job["motion"] = [float(motion[0]), float(motion[1])]
        for name in ("t0", "t1"):
            if settings.get(name) is not None:
                job[name] = int(settings[name])
    elif mode == "controlnet":
        entries = list(settings.get("controlnets", ()))
        if not entries:
            raise JobBuildError("controlnets: add at least one ControlNet for ControlNet mode")
        if len(controls) != len(entries):
            raise JobBuildError(
                f"controlnets: {len(entries)} ControlNets but {len(controls)} control videos"
            )
        family = model_families.model_family(job["model"])
        job["controlnets"] = []
        for i, (entry, control) in enumerate(zip(entries, controls, strict=True)):
            model = _controlnet_model(entry, defaults, i, family)
            job["controlnets"].append(
                {
                    "model": model,
                    "weight": float(entry.get("weight", 1.0)),
                    "detector": str(entry.get("detector", "none")),
                    "control": dict(control),
                    **_controlnet_fields(entry, model),
                }
            )
        _check_families(job)
        if flow_source is not None and job["consistency"] == "flow":
            job["flow_source"] = str(flow_source)
    else:
        if video is None:
            raise JobBuildError("video: Video Instruct-Pix2Pix needs a source strip")
        job["video"] = dict(video)
        job["image_guidance"] = float(settings.get("image_guidance", 1.5))
    return validate(job)


def map_input_paths(job: Mapping[str, Any], convert: Callable[[str], str]) -> dict[str, Any]:
    """A copy of ``job`` with ``convert`` applied to the path of every input it reads from
    disk: the pix2pix source ``video``, each ControlNet's ``control``, the ``masks`` and a
    ``flow_source`` folder (not "estimate")."""
    out = dict(job)
    if isinstance(out.get("flow_source"), str) and out["flow_source"] != "estimate":
        out["flow_source"] = convert(out["flow_source"])
    for name in ("video", "masks"):
        if isinstance(out.get(name), Mapping) and isinstance(out[name].get("path"), str):
            out[name] = {**out[name], "path": convert(out[name]["path"])}
    controlnets = out.get("controlnets")
    if isinstance(controlnets, list):
        out["controlnets"] = [
            {**entry, "control": {**entry["control"], "path": convert(entry["control"]["path"])}}
            if isinstance(entry, Mapping)
            and isinstance(entry.get("control"), Mapping)
            and isinstance(entry["control"].get("path"), str)
            else entry
            for entry in controlnets
        ]
    return out


def validate(job: Mapping[str, Any]) -> dict[str, Any]:
    """The job checked by the backend's schema, as a plain dict."""
    protocol = backend_paths.load_protocol()
    return protocol.validate_job(dict(job)).to_dict()


def _check_families(job: Mapping[str, Any]) -> None:
    """Refuse a ControlNet of another family than the base model, naming both (the backend
    refuses it too, but only once the worker has the job)."""
    problem = family_problem(job["model"], [c["model"] for c in job.get("controlnets") or ()])
    if problem:
        raise JobBuildError(problem)


def _rebuilt_controlnet(
    entry: Mapping[str, Any],
    old: Mapping[str, Any],
    defaults: Mapping[str, Any],
    index: int,
    family: str | None = None,
) -> dict[str, Any]:
    """A stored ControlNet with the panel entry's model, weight and detector applied."""
    detector = str(entry.get("detector", old.get("detector", "none")))
    out = dict(old)
    if str(entry.get("model") or "").strip() or detector != old.get("detector", "none"):
        values = {**entry, "detector": detector}
        model = _controlnet_model(values, defaults, index, family)
        out.pop("control_type", None)
        out.update(_controlnet_fields(values, model))
    else:
        model = old["model"]
    weight = float(entry.get("weight", old.get("weight", 1.0)))
    return {**out, "model": model, "weight": weight, "detector": detector}


def rebuild_job(
    stored: Mapping[str, Any],
    settings: Mapping[str, Any],
    *,
    out: str | os.PathLike[str],
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A result strip's job re-run with the panel's changes.

    The stored job keeps its mode and inputs (source video, control videos, and the frame
    count of strip-driven jobs); prompt, seed, steps, guidance, size, chunking, smoothing
    and the base model come from the panel, and so do the motion and frame count of a
    text-to-video job and the ControlNets' model, weight and detector when the panel lists
    as many ControlNets as the job has. A ControlNet whose panel model is empty keeps the
    stored model, unless its detector changed: then it gets the preferences' model for the
    new detector (a canny ControlNet would be fed depth maps otherwise).
    """
    defaults = defaults or {}
    job = dict(stored)
    mode = job.get("mode", "text2video")
    for name in REGENERATE_FIELDS:
        if name in settings:
            job[name] = settings[name]
    if not str(settings.get("prompt") or "").strip():
        job["prompt"] = stored.get("prompt", "")  # an empty panel prompt keeps the old one
    if mode == "pix2pix":
        job["smooth_bg"] = False  # pix2pix follows its moving source: the backend refuses it
    if "consistency" in settings and mode != "text2video":  # flow follows an input video
        job["consistency"] = str(settings["consistency"])
    # An empty model field means "the default": keep the model the result was made with;
    # so does the model's own prediction type (a stored one stays).
    if str(settings.get("model") or "").strip():
        job["model"] = str(settings["model"]).strip()
    if settings.get("prediction_type"):
        job["prediction_type"] = str(settings["prediction_type"])
    if mode == "text2video":
        if "motion" in settings:
            job["motion"] = [float(v) for v in settings["motion"]]
        if "frames" in settings:
            job["frames"] = int(settings["frames"])
    if "adapters" in settings:  # the panel's LoRAs and embeddings replace the stored ones
        job.update(adapter_fields(settings["adapters"]))
    entries = list(settings.get("controlnets", ()))
    if mode == "controlnet" and len(entries) == len(job.get("controlnets", [])):
        family = model_families.model_family(job["model"])
        job["controlnets"] = [
            _rebuilt_controlnet(entry, old, defaults, i, family)
            for i, (entry, old) in enumerate(zip(entries, job["controlnets"], strict=True))
        ]
    if mode == "controlnet":
        _check_families(job)
    job["out"] = str(out)
    job["frame_range"] = None
    # t0/t1 are the panel's (Advanced); unset, they follow the step count.
    job["t0"] = settings.get("t0") if mode == "text2video" else None
    job["t1"] = settings.get("t1") if mode == "text2video" else None
    return validate(job)
