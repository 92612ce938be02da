"""Detector weights: RT-DETR, VitPose and Depth Anything from safetensors, through the hub.

The ``openpose`` and ``depth`` detectors (``backend.media.detectors``) run transformers
models named by hub id or local folder (``protocol.DETECTOR_MODELS``, replaced per ControlNet
by ``detector_models``). A hub id downloads through ``hub.fetch_model`` (progress, cancel,
offline from the cache, a clear error within seconds when offline and not cached); every
model loads with ``use_safetensors=True`` and no remote code, so nothing is unpickled.
Image processors are the PIL (numpy) ones: no torchvision needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..protocol import SAFE_SUFFIXES, detector_models, split_hub_id
from .hub import DownloadHooks, HubError, fetch_model
from .loading import ModelLoadError, resolve_source
from .safety import ModelFileError, check_config_folder, forbid_remote_code

# Keyword arguments of every detector from_pretrained: local files, safetensors, no remote code.
SAFE_LOAD = {"use_safetensors": True, "trust_remote_code": False, "local_files_only": True}


@dataclass
class PoseModels:
    """The openpose detector's models: a person detector and a keypoint estimator."""

    detector: Any  # RTDetrForObjectDetection
    detector_processor: Any  # RTDetrImageProcessor (PIL)
    pose: Any  # VitPoseForPoseEstimation
    pose_processor: Any  # VitPoseImageProcessor (PIL)
    person_label: int  # the detector's class id of "person"
    device: torch.device
    dtype: torch.dtype


@dataclass
class DepthModel:
    """The depth detector's model and which way its output points."""

    model: Any  # DepthAnythingForDepthEstimation (or DPT)
    processor: Any  # DPTImageProcessor (PIL)
    device: torch.device
    dtype: torch.dtype
    # Relative models (Depth Anything, DPT/MiDaS) predict inverse depth: larger is nearer.
    # Metric ones (depth_estimation_type "metric") predict metres: larger is farther.
    near_is_larger: bool = True


def detector_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA (the detectors' weights are fp32; fp16 halves their memory), else fp32."""
    return torch.float16 if device.type == "cuda" else torch.float32


def pil_processor(name: str) -> type:
    """transformers' PIL image processor ``name`` (``{name}Pil`` since 5.x): no torchvision."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def detector_folder(name: str, role: str, download: DownloadHooks | None = None) -> Path:
    """The local folder of detector model ``name`` (a folder, or a hub repo downloaded or
    found in the cache); ModelLoadError naming the role and the model otherwise."""
    try:
        kind, location = resolve_source(name)
    except ModelLoadError as exc:
        raise ModelLoadError(f"detector model {role!r}: {exc}") from exc
    if kind == "file" or (kind == "hub" and split_hub_id(name)[1]):
        raise ModelLoadError(
            f"detector model {role!r} must be a transformers folder or a hub repo "
            f"(owner/name), got {name!r}"
        )
    if kind == "hub":
        try:
            location = str(fetch_model(name, allow_pickle=False, hooks=download))
        except HubError as exc:
            raise ModelLoadError(
                f"detector model {role!r}: {exc} (a detector takes a transformers folder "
                f"instead: the ControlNet's detector_models.{role})"
            ) from exc
    folder = Path(location)
    try:  # configs asking for custom code (auto_map) are refused before transformers reads them
        check_config_folder(folder)
    except ModelFileError as exc:
        raise ModelLoadError(f"detector model {role!r}: {exc}") from exc
    if not any(p.suffix in SAFE_SUFFIXES for p in folder.iterdir()):
        raise ModelLoadError(
            f"detector model {role!r} ({name}) has no .safetensors weights in {folder}: "
            "detectors load safetensors only"
        )
    return folder


def _model(cls: type, folder: Path, name: str, device: torch.device, dtype: torch.dtype) -> Any:
    """``cls`` from ``folder`` (safetensors only) on ``device`` in ``dtype``, for inference."""
    try:
        model = cls.from_pretrained(folder, **SAFE_LOAD)
    except Exception as exc:  # noqa: BLE001 (config and weight errors differ by model)
        raise ModelLoadError(f"could not load detector model {name!r}: {exc}") from exc
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _person_label(config: Any) -> int:
    """The class id a detector's config names "person" (COCO's 0 when none does)."""
    for index, label in (getattr(config, "id2label", None) or {}).items():
        if str(label).lower() == "person":
            return int(index)
    return 0


def load_pose_models(
    models: dict[str, str], device: torch.device, download: DownloadHooks | None = None
) -> PoseModels:
    """The openpose detector's models by role ("person", "pose"), safetensors only."""
    from transformers import RTDetrForObjectDetection, VitPoseForPoseEstimation

    dtype = detector_dtype(device)
    person = detector_folder(models["person"], "person", download)
    pose = detector_folder(models["pose"], "pose", download)
    detector = _model(RTDetrForObjectDetection, person, models["person"], device, dtype)
    return PoseModels(
        detector=detector,
        detector_processor=pil_processor("RTDetrImageProcessor").from_pretrained(person),
        pose=_model(VitPoseForPoseEstimation, pose, models["pose"], device, dtype),
        pose_processor=pil_processor("VitPoseImageProcessor").from_pretrained(pose),
        person_label=_person_label(detector.config),
        device=device,
        dtype=dtype,
    )


def load_depth_model(
    models: dict[str, str], device: torch.device, download: DownloadHooks | None = None
) -> DepthModel:
    """The depth detector's model by role ("depth"), safetensors only."""
    from transformers import AutoModelForDepthEstimation

    dtype = detector_dtype(device)
    folder = detector_folder(models["depth"], "depth", download)
    model = _model(AutoModelForDepthEstimation, folder, models["depth"], device, dtype)
    return DepthModel(
        model=model,
        processor=pil_processor("DPTImageProcessor").from_pretrained(folder),
        device=device,
        dtype=dtype,
        near_is_larger=getattr(model.config, "depth_estimation_type", None) != "metric",
    )


def load_detector(
    detector: str,
    overrides: dict[str, str] | None,
    device: torch.device,
    download: DownloadHooks | None = None,
) -> PoseModels | DepthModel:
    """The loaded models of model detector ``detector`` (defaults with ``overrides``)."""
    models = detector_models(detector, overrides)
    forbid_remote_code()  # whatever slips past the config check: an error, never a prompt
    if detector == "openpose":
        return load_pose_models(models, device, download)
    if detector == "depth":
        return load_depth_model(models, device, download)
    raise ValueError(f"detector {detector!r} loads no models")
