"""The job schema and the worker's message protocol: the one contract shared with the add-on.

Stdlib only: Blender's Python imports this module to build and check jobs before they
cross the process boundary, so it must never import torch, numpy or anything heavy.

A job is a JSON object. ``validate_job`` is the one place that checks it: unknown fields,
wrong types and out-of-range values raise ``JobError`` naming the field and the value.
The same validated job runs from the CLI, the worker and the add-on, and is written as
``job.json`` next to every result so it can be reproduced or regenerated.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import reprlib
import shutil
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
# Model families (backend/models/families.py reads them from the model): SD 1.x, 2.x, SDXL.
FAMILIES = ("sd1", "sd2", "sdxl")
FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# The side of the square of each family's training pixel count (SD 2.x: its 768 px models).
FAMILY_SIDES = {"sd1": 512, "sd2": 768, "sdxl": 1024}
# A union ControlNet's control types (xinsir's controlnet-union-sdxl-1.0 and ProMax
# numbering; ControlNetUnionModel's control_mode): the name a job gives -> the index.
UNION_CONTROL_TYPES = {
    "openpose": 0,
    "depth": 1,
    "softedge": 2,
    "hed": 2,
    "scribble": 2,
    "canny": 3,
    "lineart": 3,
    "mlsd": 3,
    "normal": 4,
    "segment": 5,
    "tile": 6,
    "inpaint": 7,
}
# A .safetensors header larger than this is not read to tell a family (SDXL's is ~0.3 MB).
MAX_HEADER_BYTES = 64 * 1024 * 1024
# What the UNet predicts (the scheduler's prediction_type): the noise ("epsilon": SD 1.x,
# SDXL, SD 2.x at 512 px) or v ("v_prediction": SD 2.x at 768 px). The tensors cannot tell
# them apart; a job's prediction_type overrides the model's scheduler config, and for an
# SD 2.x single file it also picks the 512 px or the 768 px configs repo.
PREDICTION_TYPES = ("epsilon", "v_prediction")
# A single file's own word for it, in its safetensors ``__metadata__``: Stability's model
# spec (sai_model_spec 1.0: modelspec.prediction_type "v" / "epsilon"; modelspec.architecture
# "stable-diffusion-v2-768-v" / "stable-diffusion-v2-512", as kohya's sd-scripts write them)
# and the LDM configs' ``parameterization`` ("v" / "eps"). Most specific key first.
PREDICTION_HINTS = (
    ("modelspec.prediction_type", {"v": "v_prediction", "epsilon": "epsilon"}),
    (
        "modelspec.architecture",
        {"stable-diffusion-v2-768-v": "v_prediction", "stable-diffusion-v2-512": "epsilon"},
    ),
    ("parameterization", {"v": "v_prediction", "eps": "epsilon", "epsilon": "epsilon"}),
)


# The rules that tell a family from a model's own files. Plain Python, so the add-on reads
# them too (its panel's family and native size); backend/models/families.py builds on them.


def family_from_config(config: dict[str, Any], has_text_encoder_2: bool = False) -> str:
    """The family key of a UNet or ControlNet diffusers config.

    SDXL: ``addition_embed_type`` "text_time" (pooled text and size ids), or a pipeline with
    a second text encoder. SD 2.x: linear projections in the transformer blocks, or
    1024-wide text (OpenCLIP-H). Otherwise SD 1.x.
    """
    if has_text_encoder_2 or config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if config.get("use_linear_projection") or config.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd1"


# Tensor-name prefixes of original-format (LDM / SGM) checkpoints, most specific first.
CHECKPOINT_PREFIXES = (
    ("conditioner.embedders.1.", "sdxl"),  # SGM: CLIP-L is embedders.0, OpenCLIP-bigG .1
    ("cond_stage_model.model.", "sd2"),  # LDM with OpenCLIP-H
    ("cond_stage_model.transformer.", "sd1"),  # LDM with CLIP-L
)
# Tensors only SDXL's added embedding has: original format (label_emb), diffusers format.
XL_TENSOR_SUFFIXES = ("label_emb.0.0.weight", "add_embedding.linear_1.weight")


def family_from_tensors(shapes: dict[str, Any]) -> str | None:
    """The family key of a checkpoint (base model or ControlNet) from tensor names to shapes,
    or None when they do not tell.

    Text-encoder prefixes decide for a whole checkpoint; a lone UNet or ControlNet is SDXL
    with the added embedding, else SD 2.x when its cross-attention reads 1024-wide text or
    every ``proj_in`` is linear (2-D), else SD 1.x.
    """
    for prefix, family in CHECKPOINT_PREFIXES:
        if any(key.startswith(prefix) for key in shapes):
            return family
    if any(key.endswith(suffix) for key in shapes for suffix in XL_TENSOR_SUFFIXES):
        return "sdxl"
    widths = {tuple(s)[-1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight") and s}
    if not widths:
        return None
    if 1024 in widths:
        return "sd2"
    linear = [len(s) == 2 for k, s in shapes.items() if k.endswith("proj_in.weight")]
    return "sd2" if linear and all(linear) else "sd1"


def safetensors_header(path: str | Path) -> dict[str, Any] | None:
    """A .safetensors file's JSON header (tensor entries and ``__metadata__``; no tensor is
    read), or None when it is no readable safetensors file."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= MAX_HEADER_BYTES:
                return None
            header = json.loads(f.read(size).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def prediction_type_hint(metadata: dict[str, Any] | None) -> tuple[str, str] | None:
    """(prediction type, the metadata key that says so) from a single file's safetensors
    ``__metadata__`` (PREDICTION_HINTS, most specific key first), or None when it says
    nothing this reads (a value outside a key's table is not guessed at)."""
    if not isinstance(metadata, dict):
        return None
    for key, values in PREDICTION_HINTS:
        value = metadata.get(key)
        if isinstance(value, str) and value.strip().lower() in values:
            return values[value.strip().lower()], key
    return None


def file_prediction_type(path: str | Path) -> tuple[str, str] | None:
    """``prediction_type_hint`` of a .safetensors file's metadata; None for other files."""
    if Path(path).suffix.lower() != ".safetensors":
        return None
    header = safetensors_header(path)
    return None if header is None else prediction_type_hint(header.get("__metadata__"))


def safetensors_shapes(path: str | Path) -> dict[str, list[int]] | None:
    """Tensor name -> shape from a .safetensors file's JSON header (no tensor is read), or
    None when it is no readable safetensors file."""
    header = safetensors_header(path)
    if header is None:
        return None
    return {
        k: v.get("shape") or []
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict)
    }


def family_of_path(path: str | Path) -> str | None:
    """The family key of a local diffusers folder (its configs) or .safetensors file (its
    tensor names), or None when they do not tell."""
    root = Path(path)
    if root.is_dir():
        for config_file in (root / "unet" / "config.json", root / "config.json"):
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(config, dict):
                pipeline = config_file.parent.name == "unet"
                return family_from_config(config, pipeline and (root / "text_encoder_2").is_dir())
        return None
    if root.suffix.lower() == ".safetensors":
        shapes = safetensors_shapes(root)
        return None if shapes is None else family_from_tensors(shapes)
    return None


MODES = ("text2video", "controlnet", "pix2pix")
# Detectors that turn a control video into control images in the backend (see README).
# openpose and depth run transformers models from safetensors (MODEL_DETECTORS); the
# AUX_DETECTORS exist only in controlnet-aux, whose lllyasviel/Annotators weights are pickles.
MODEL_DETECTORS = ("openpose", "depth")
AUX_DETECTORS = ("hed", "lineart", "mlsd")
DETECTORS = ("none", "canny", *MODEL_DETECTORS, *AUX_DETECTORS)
# Python modules a detector needs in the backend environment (the add-on looks for them
# without importing): scipy comes with the requirements (VitPose's image processor uses it);
# install_deps.py --detectors installs controlnet-aux and a torchvision for the extras.
DETECTOR_MODULES = {
    "openpose": ("scipy",),
    **{name: ("controlnet_aux", "torchvision") for name in AUX_DETECTORS},
}
# The weights of the model detectors by role, the one place they are named: hub ids of
# safetensors repos (all Apache-2.0), replaced per ControlNet by ``detector_models``.
DETECTOR_MODELS = {
    # RT-DETR finds the people, VitPose their 17 COCO keypoints in each box.
    "openpose": {
        "person": "PekingU/rtdetr_r50vd_coco_o365",
        "pose": "usyd-community/vitpose-base-simple",
    },
    # Depth Anything V2 Small (the Base and Large weights are CC-BY-NC-4.0).
    "depth": {"depth": "depth-anything/Depth-Anything-V2-Small-hf"},
}
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "float32", "float16", "bfloat16")
FITS = ("crop", "pad", "stretch")
# Frame-to-frame consistency (controlnet, pix2pix): "paper", cross-frame attention to frame 1
# (Sect. 3.3.2); "flow", also each frame tied to the previous one along the input's motion.
CONSISTENCIES = ("paper", "flow")
# flow_source meaning "estimate the motion from the input video" (else a folder of frames).
FLOW_ESTIMATE = "estimate"

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_PIX2PIX_MODEL = "timbrooks/instruct-pix2pix"


@dataclass(frozen=True)
class KnownControlNet:
    """A ControlNet repo on the Hub: its family, and the control it was trained on."""

    family: str  # FAMILIES
    kind: str  # a detector or scene pass kind (canny, openpose, depth, hed...), or "union"
    # The repo holds only pickled .bin weights: it loads only where pickles are allowed.
    pickled: bool = False


# The one table of ControlNets the add-on knows by hub id, each tagged with its family (a
# hub id not downloaded has no files to read it from). Its panel offers those of the base
# model's family, and DEFAULT_CONTROLNETS picks each family's own per kind.
KNOWN_CONTROLNETS = {
    "lllyasviel/sd-controlnet-canny": KnownControlNet("sd1", "canny"),
    "lllyasviel/sd-controlnet-openpose": KnownControlNet("sd1", "openpose"),
    "lllyasviel/sd-controlnet-depth": KnownControlNet("sd1", "depth"),
    "lllyasviel/control_v11p_sd15_canny": KnownControlNet("sd1", "canny"),
    "lllyasviel/control_v11p_sd15_openpose": KnownControlNet("sd1", "openpose"),
    "lllyasviel/control_v11f1p_sd15_depth": KnownControlNet("sd1", "depth"),
    "lllyasviel/control_v11p_sd15_softedge": KnownControlNet("sd1", "hed"),
    "lllyasviel/control_v11p_sd15_lineart": KnownControlNet("sd1", "lineart"),
    "lllyasviel/control_v11p_sd15_mlsd": KnownControlNet("sd1", "mlsd"),
    # Thibaud Zamora's SD 2.1 ControlNets in diffusers format (.bin weights only).
    "thibaud/controlnet-sd21-canny-diffusers": KnownControlNet("sd2", "canny", pickled=True),
    "thibaud/controlnet-sd21-openpose-diffusers": KnownControlNet("sd2", "openpose", pickled=True),
    "thibaud/controlnet-sd21-depth-diffusers": KnownControlNet("sd2", "depth", pickled=True),
    "thibaud/controlnet-sd21-hed-diffusers": KnownControlNet("sd2", "hed", pickled=True),
    "diffusers/controlnet-canny-sdxl-1.0": KnownControlNet("sdxl", "canny"),
    "diffusers/controlnet-depth-sdxl-1.0": KnownControlNet("sdxl", "depth"),
    # Its folder's weights are .bin; OpenPoseXL2.safetensors beside them is the same model.
    "thibaud/controlnet-openpose-sdxl-1.0": KnownControlNet("sdxl", "openpose", pickled=True),
    "xinsir/controlnet-union-sdxl-1.0": KnownControlNet("sdxl", "union"),
}
# Each family's default ControlNet per control kind: what an entry with no model of its own
# gets when the preferences' model for its kind is of another family.
DEFAULT_CONTROLNETS = {
    "sd1": {
        "canny": "lllyasviel/sd-controlnet-canny",
        "openpose": "lllyasviel/sd-controlnet-openpose",
        "depth": "lllyasviel/sd-controlnet-depth",
    },
    "sd2": {
        "canny": "thibaud/controlnet-sd21-canny-diffusers",
        "openpose": "thibaud/controlnet-sd21-openpose-diffusers",
        "depth": "thibaud/controlnet-sd21-depth-diffusers",
    },
    "sdxl": {
        "canny": "diffusers/controlnet-canny-sdxl-1.0",
        "openpose": "thibaud/controlnet-openpose-sdxl-1.0",
        "depth": "diffusers/controlnet-depth-sdxl-1.0",
    },
}
# Base models the add-on knows by hub id (the defaults and their families' reference repos).
KNOWN_MODELS = {
    DEFAULT_MODEL: "sd1",
    "runwayml/stable-diffusion-v1-5": "sd1",
    "CompVis/stable-diffusion-v1-4": "sd1",
    DEFAULT_PIX2PIX_MODEL: "sd1",
    "stabilityai/stable-diffusion-2-1": "sd2",
    "stabilityai/stable-diffusion-2-1-base": "sd2",
    "stabilityai/stable-diffusion-2": "sd2",
    "stabilityai/stable-diffusion-2-base": "sd2",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "diffusers/sdxl-instructpix2pix-768": "sdxl",
}


def known_family(name: str) -> str | None:
    """The family key of a base model or ControlNet in the known-hub-id tables, else None."""
    name = (name or "").strip()
    known = KNOWN_CONTROLNETS.get(name)
    return known.family if known is not None else KNOWN_MODELS.get(name)


# Official Text2Video-Zero defaults, in 1/512 of the frame per frame (Sect. 3.3.1).
DEFAULT_MOTION = (12.0, 12.0)
# Official t0/t1 for 50 DDIM steps; ``resolve_t0_t1`` scales them to other step counts.
DEFAULT_T0, DEFAULT_T1, DEFAULT_T_STEPS = 44, 47, 50

# Hub ids: a whole repo (owner/name), or one file of it (owner/name/path/file.safetensors)
# named by its weight suffix; pickled files load only where pickles are allowed.
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
HUB_ID_FORMS = "owner/name, or owner/name/path/file.safetensors for one file of a repo"
# The Hub's own limit on an owner or repo name, and on a whole id with a file path (a
# 5000-character "id" would otherwise reach the file system as a path: ENAMETOOLONG).
MAX_HUB_NAME_CHARS = 96
MAX_HUB_ID_CHARS = 512
# An owner or repo name as huggingface_hub validates it: letters, digits, _ . - (no
# leading or trailing . or -, no "--" or "..").
_HUB_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")

# OpenPose keypoint files (a control path ending in .json): {"format": POSE_FORMAT,
# "frames": [[person, ...], ...]}, a person being 18 entries in KEYPOINT_NAMES order, each
# null (left out) or [x, y] normalised to the frame (x right, y down, 0..1).
POSE_FORMAT = "openpose18"
KEYPOINT_NAMES = (
    "nose",
    "neck",
    "r_shoulder",
    "r_elbow",
    "r_wrist",
    "l_shoulder",
    "l_elbow",
    "l_wrist",
    "r_hip",
    "r_knee",
    "r_ankle",
    "l_hip",
    "l_knee",
    "l_ankle",
    "r_eye",
    "l_eye",
    "r_ear",
    "l_ear",
)

# How an OpenPose picture is drawn (the SD 1.5 / SDXL OpenPose ControlNets' annotator), for
# the backend's control images and the add-on's preview alike. Limbs as (keypoint,
# keypoint) pairs, 0-based in KEYPOINT_NAMES order, in the annotator's drawing order.
POSE_LIMBS = (
    (1, 2),
    (1, 5),
    (2, 3),
    (3, 4),
    (5, 6),
    (6, 7),
    (1, 8),
    (8, 9),
    (9, 10),
    (1, 11),
    (11, 12),
    (12, 13),
    (1, 0),
    (0, 14),
    (14, 16),
    (0, 15),
    (15, 17),
)
# RGB; limb i and keypoint i share colour i.
POSE_COLORS = (
    (255, 0, 0),
    (255, 85, 0),
    (255, 170, 0),
    (255, 255, 0),
    (170, 255, 0),
    (85, 255, 0),
    (0, 255, 0),
    (0, 255, 85),
    (0, 255, 170),
    (0, 255, 255),
    (0, 170, 255),
    (0, 85, 255),
    (0, 0, 255),
    (85, 0, 255),
    (170, 0, 255),
    (255, 0, 255),
    (255, 0, 170),
    (255, 0, 85),
)
POSE_LIMB_ALPHA = 0.6
# Stick half-width and keypoint radius of the annotator at its 512 px detect resolution.
POSE_BASE_WIDTH = 4
POSE_BASE_SIDE = 512

MAX_SIDE = 4096
MAX_FRAMES = 100_000
# DDIM steps: with the SD schedule's steps_offset of 1, 1000 steps would ask for timestep
# 1000 of a 1000-step schedule; 999 is the most any SD 1.x model can run.
MAX_STEPS = 999
# Prompt and negative prompt length in characters: CLIP reads 77 tokens (about 300
# characters of English) and cuts the rest, so this is generous; it keeps a pasted
# megabyte from being tokenised (and written to job.json) just to be cut off.
MAX_PROMPT_CHARS = 2000
# One protocol line (a worker request) and one job file, in bytes: a job with paths and
# settings is a few KB. Longer input is refused without being read into memory.
MAX_LINE_BYTES = 1 << 20
# Error messages show a bad value cut to about this many characters, with its length.
MAX_ECHO_CHARS = 80
# Error replies carry at most this many characters of message and of traceback.
MAX_MESSAGE_CHARS = 4000
MAX_TRACEBACK_CHARS = 20_000


class JobError(ValueError):
    """A job field has a bad value; the message names the field and the value."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class VideoInput:
    """A video read from a folder of images or a movie file."""

    path: str
    # Index (0-based) of the first source frame to read: a strip's offset in the source.
    start: int = 0
    # Source frames per output frame: 1.0 reads every frame, 2.0 every other one
    # (a 48 fps source on a 24 fps timeline), 0.5 repeats each frame.
    stride: float = 1.0
    # The source frame index of each output frame, replacing start and stride: what a
    # retimed sequencer strip shows (Blender rounds, start + stride floors).
    indices: list[int] | None = None


@dataclass
class ControlNetSpec:
    """One ControlNet with its control video and weight."""

    model: str
    control: VideoInput
    # conditioning_scale of this ControlNet; several ControlNets add their residuals.
    weight: float = 1.0
    # Turns the control video into a control image in the backend ("none": use as is).
    # A control path ending in .json holds OpenPose keypoints and is drawn by the backend.
    detector: str = "none"
    # Where a single-file ControlNet gets its config.json (a diffusers ControlNet folder or
    # hub id); None: the SD 1.5 ControlNet config shipped with the backend (no network).
    config: str | None = None
    # Hub ids or local folders replacing DETECTOR_MODELS[detector] by role for this
    # ControlNet (e.g. {"pose": "usyd-community/vitpose-plus-small"}); None: the defaults.
    detector_models: dict[str, str] | None = None
    # For a union ControlNet (one model, many kinds of control): which kind this video is
    # (UNION_CONTROL_TYPES); None: the detector's kind (canny, depth, openpose...).
    control_type: str | None = None


@dataclass
class LoraSpec:
    """A LoRA applied to the base model for one job (diffusers' loaders, peft)."""

    # A .safetensors file, a folder holding one, or a hub id.
    path: str
    # Strength of the LoRA: 0 leaves the model as it is, 1 as trained, negative inverts it.
    weight: float = 1.0


@dataclass
class EmbeddingSpec:
    """A textual inversion embedding, used in prompts by its token."""

    # A .safetensors file (diffusers or A1111 format), a folder holding one, or a hub id.
    path: str
    # The word that stands for the embedding in prompts, e.g. "<my-style>".
    token: str


@dataclass
class Job:
    """Everything that defines one generation; ``job.json`` holds exactly this."""

    prompt: str
    out: str
    mode: str = "text2video"
    model: str = DEFAULT_MODEL
    # Where a single-file checkpoint gets its component configs and tokenizer
    # (a diffusers folder or hub id of the same architecture); None: the SD 1.5 configs.
    model_config: str | None = None
    # What the UNet predicts (PREDICTION_TYPES), replacing its scheduler config's; for an
    # SD 2.x single file also its default configs (epsilon: 2-1-base, 512 px; v: 2-1, 768
    # px). None: the model's own (a single file's metadata hint, else its configs'). job.json
    # records what ran.
    prediction_type: str | None = None
    negative_prompt: str = ""
    frames: int = 8
    # Pixels, multiples of 8. None: the model's native pixel count (SD 1.x: 512x512) at the
    # input video's aspect ratio (controlnet, pix2pix) or square (text2video); one of them
    # given: the other from that aspect. The runner resolves them; job.json holds the result.
    width: int | None = None
    height: int | None = None
    # How input videos (source, controls, masks) of another aspect meet the job's size:
    # "crop" scales to cover and centre-crops, "pad" fits inside on black, "stretch" distorts.
    fit: str = "crop"
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0
    # Frames denoised together; memory grows with it, results do not depend on it.
    chunk_size: int = 8
    # 1-based inclusive [first, last] frames of the full job to compute (render-farm shards).
    frame_range: list[int] | None = None
    # Global translation per frame in 1/512 of the frame (x right, y down: the camera pans,
    # the content drifts the other way, as in the official code). None: the mode's default,
    # (12, 12) for text2video and no motion for controlnet.
    motion: list[float] | None = None
    # DDIM step counts of the motion-dynamics phase (Sect. 3.3.1); None: 44/47 of 50, scaled.
    t0: int | None = None
    t1: int | None = None
    # Background smoothing (Sect. 3.3.3): foreground masks from the prompt's
    # cross-attention, or from ``masks`` (white = foreground).
    smooth_bg: bool = False
    smooth_alpha: float = 0.6
    masks: VideoInput | None = None
    # "paper" (cross-frame attention only) or "flow": each frame's predicted clean latent is
    # also fused with the previous frame's, warped along the motion (Rerender-A-Video). Under
    # "flow" frame k depends on k - 1: a frame_range computes every frame before it too.
    consistency: str = "paper"
    # Where "flow" gets the motion: None or "estimate" (optical flow of the pix2pix source or
    # of the first control video that is a video), or a folder of .npy or OpenEXR motion-vector
    # frames (backend/media/flow.py).
    flow_source: str | None = None
    controlnets: list[ControlNetSpec] = field(default_factory=list)
    # Applied to the base model for this job only; the cached model is clean afterwards.
    loras: list[LoraSpec] = field(default_factory=list)
    embeddings: list[EmbeddingSpec] = field(default_factory=list)
    # pix2pix: the source video and how strongly the output follows it.
    video: VideoInput | None = None
    image_guidance: float = 1.5
    device: str = "auto"
    dtype: str = "auto"
    fps: float = 8.0
    write_mp4: bool = True
    save_latents: bool = False
    # torch.compile the UNet and ControlNets: the first job of a model and size is slower
    # (the compile), later ones in the same worker faster; off by default (slower on CPUs).
    compile: bool = False
    # Recorded in job.json: whether the run allowed pickled weights. Reading it back enables
    # nothing: only --allow-pickle or the add-on preference do (see run_job).
    allow_pickle: bool = False
    # Recorded in job.json: the family the model was read as (sd1, sd2, sdxl). Given, a model
    # of another family is refused (a result regenerated on a swapped model). None: any.
    family: str | None = None
    version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The job as a plain JSON-ready dict."""
        return asdict(self, dict_factory=_dict_without_unset_indices)

    def to_json(self) -> str:
        """The job as pretty JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def effective_motion(self) -> tuple[float, float]:
        """The motion the engine applies: the explicit one or the mode's default."""
        if self.motion is not None:
            return (float(self.motion[0]), float(self.motion[1]))
        return DEFAULT_MOTION if self.mode == "text2video" else (0.0, 0.0)

    @property
    def frame_indices(self) -> list[int]:
        """0-based indices of the frames this job outputs."""
        if self.frame_range is None:
            return list(range(self.frames))
        first, last = self.frame_range
        return list(range(first - 1, last))


# Optional fields left out of a job's dict while unset (jobs written before them stay equal).
_LEFT_OUT_UNSET = ("indices", "detector_models", "family", "control_type", "prediction_type")


def _dict_without_unset_indices(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """A dataclass as a dict, leaving out a VideoInput's ``indices`` and a ControlNet's
    ``detector_models`` when they are unset."""
    return {k: v for k, v in items if not (k in _LEFT_OUT_UNSET and v is None)}


def detector_models(detector: str, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The weights ``detector`` loads by role: DETECTOR_MODELS with ``overrides`` applied
    ({} for detectors that load no transformers model)."""
    return {**DETECTOR_MODELS.get(detector, {}), **(overrides or {})}


# --------------------------------------------------------------------------- checks

_SHORT = reprlib.Repr()  # keyword arguments only from Python 3.12: Blender 4.2 has 3.11
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 60, 60
_SHORT.maxtuple = _SHORT.maxlist = _SHORT.maxdict = 4


def shown(value: Any) -> str:
    """A bad value for an error message: its repr cut short, with its length if it was long."""
    try:
        text = _SHORT.repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deeply>"
    if len(text) > MAX_ECHO_CHARS:
        text = text[: MAX_ECHO_CHARS - 3] + "..."
    if isinstance(value, (str, list, dict, tuple)) and "..." in text:
        unit = "characters" if isinstance(value, str) else "items"
        text += f" ({len(value)} {unit})"
    return text


def clip_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return text[:limit] + f" ... [{len(text) - limit} more characters]"


def _type_name(value: Any) -> str:
    return type(value).__name__


def _check_type(name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    # bool is an int in Python; a JSON true for an int field is still a wrong type.
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise JobError(name, f"expected {'/'.join(k.__name__ for k in kinds)}, got {value!r}")
    if not isinstance(value, kinds):
        raise JobError(
            name,
            f"expected {'/'.join(k.__name__ for k in kinds)}, got {_type_name(value)} "
            f"{shown(value)}",
        )
    return value


def _int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    _check_type(name, value, int)
    if lo is not None and value < lo:
        raise JobError(name, f"must be at least {lo}, got {value}")
    if hi is not None and value > hi:
        raise JobError(name, f"must be at most {hi}, got {value}")
    return value


def _float(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    _check_type(name, value, (int, float))
    value = float(value)
    if not math.isfinite(value):
        raise JobError(name, f"must be a finite number, got {value}")
    if lo is not None and value < lo:
        raise JobError(name, f"must be at least {lo}, got {value}")
    if hi is not None and value > hi:
        raise JobError(name, f"must be at most {hi}, got {value}")
    return value


def _str(name: str, value: Any, nonempty: bool = False, max_chars: int | None = None) -> str:
    _check_type(name, value, str)
    if max_chars is not None and len(value) > max_chars:
        raise JobError(
            name, f"must be at most {max_chars} characters, got {len(value)}: {shown(value)}"
        )
    if nonempty and not value.strip():
        raise JobError(name, "must not be empty")
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    _check_type(name, value, str)
    if value not in choices:
        raise JobError(name, f"must be one of {', '.join(choices)}, got {shown(value)}")
    return value


def _no_unknown(name: str, data: dict, cls: type) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{name}." if name else ""
        key = unknown[0] if len(unknown[0]) <= MAX_ECHO_CHARS else shown(unknown[0])
        raise JobError(f"{where}{key}", f"unknown field (value {shown(data[unknown[0]])})")


def _video(name: str, value: Any) -> VideoInput:
    """A VideoInput from a path string or a {path, start, stride, indices} object."""
    if isinstance(value, str):
        value = {"path": value}
    _check_type(name, value, dict)
    _no_unknown(name, value, VideoInput)
    if "path" not in value:
        raise JobError(f"{name}.path", "is required")
    indices = value.get("indices")
    if indices is not None:
        _check_type(f"{name}.indices", indices, list)
        if not 1 <= len(indices) <= MAX_FRAMES:
            raise JobError(
                f"{name}.indices", f"must list 1 to {MAX_FRAMES} frames, got {len(indices)}"
            )
        indices = [_int(f"{name}.indices[{i}]", v, lo=0) for i, v in enumerate(indices)]
    return VideoInput(
        path=_str(f"{name}.path", value["path"], nonempty=True),
        start=_int(f"{name}.start", value.get("start", 0), lo=0),
        stride=_float(f"{name}.stride", value.get("stride", 1.0), lo=1e-3, hi=1000.0),
        indices=indices,
    )


def _controlnet(name: str, value: Any) -> ControlNetSpec:
    _check_type(name, value, dict)
    _no_unknown(name, value, ControlNetSpec)
    for required in ("model", "control"):
        if required not in value:
            raise JobError(f"{name}.{required}", "is required")
    return ControlNetSpec(
        model=_str(f"{name}.model", value["model"], nonempty=True),
        control=_video(f"{name}.control", value["control"]),
        weight=_float(f"{name}.weight", value.get("weight", 1.0), lo=0.0, hi=10.0),
        detector=_choice(f"{name}.detector", value.get("detector", "none"), DETECTORS),
        config=None
        if value.get("config") is None
        else _str(f"{name}.config", value["config"], nonempty=True),
        detector_models=_detector_models(name, value),
        control_type=None
        if value.get("control_type") is None
        else _choice(f"{name}.control_type", value["control_type"], tuple(UNION_CONTROL_TYPES)),
    )


def _detector_models(name: str, value: dict) -> dict[str, str] | None:
    """A ControlNet's ``detector_models``: roles its detector loads, each a hub id or folder."""
    models = value.get("detector_models")
    if models is None:
        return None
    where = f"{name}.detector_models" if name else "detector_models"
    _check_type(where, models, dict)
    detector = value.get("detector", "none")
    roles = DETECTOR_MODELS.get(detector)
    if roles is None:
        raise JobError(
            where,
            f"detector {detector!r} loads no models; only {', '.join(MODEL_DETECTORS)} take "
            "detector_models",
        )
    for role, model in models.items():
        if role not in roles:
            raise JobError(
                f"{where}.{role}",
                f"detector {detector!r} has no model {shown(role)}; its models are "
                f"{', '.join(roles)}",
            )
        _str(f"{where}.{role}", model, nonempty=True)
    return dict(models)


def _lora(name: str, value: Any) -> LoraSpec:
    """A LoraSpec from a path string or a {path, weight} object."""
    if isinstance(value, str):
        value = {"path": value}
    _check_type(name, value, dict)
    _no_unknown(name, value, LoraSpec)
    if "path" not in value:
        raise JobError(f"{name}.path", "is required")
    return LoraSpec(
        path=_str(f"{name}.path", value["path"], nonempty=True),
        weight=_float(f"{name}.weight", value.get("weight", 1.0), lo=-10.0, hi=10.0),
    )


def _embedding(name: str, value: Any) -> EmbeddingSpec:
    _check_type(name, value, dict)
    _no_unknown(name, value, EmbeddingSpec)
    for required in ("path", "token"):
        if required not in value:
            raise JobError(f"{name}.{required}", "is required")
    token = _str(f"{name}.token", value["token"], nonempty=True)
    if token != token.strip() or len(token.split()) != 1:
        raise JobError(f"{name}.token", f"must be one word without spaces, got {token!r}")
    return EmbeddingSpec(path=_str(f"{name}.path", value["path"], nonempty=True), token=token)


def _adapters(d: dict) -> tuple[list[LoraSpec], list[EmbeddingSpec]]:
    """The job's LoRAs and embeddings; an embedding token may appear only once."""
    loras_raw = d.get("loras", [])
    _check_type("loras", loras_raw, (list, tuple))
    loras = [_lora(f"loras[{i}]", v) for i, v in enumerate(loras_raw)]
    embeddings_raw = d.get("embeddings", [])
    _check_type("embeddings", embeddings_raw, (list, tuple))
    embeddings = [_embedding(f"embeddings[{i}]", v) for i, v in enumerate(embeddings_raw)]
    seen: set[str] = set()
    for i, embedding in enumerate(embeddings):
        if embedding.token in seen:
            raise JobError(f"embeddings[{i}].token", f"{embedding.token!r} is used twice")
        seen.add(embedding.token)
    return loras, embeddings


def hub_id_problem(name: str) -> str:
    """Why ``name`` is not a hub id (owner/name or owner/name/path/file.safetensors); "" when
    it is one. Says nothing of local paths: a path that exists wins over a hub id."""
    if len(name) > MAX_HUB_ID_CHARS:
        return f"a hub id is at most {MAX_HUB_ID_CHARS} characters, this one has {len(name)}"
    parts = name.split("/")
    if len(parts) >= 2 and max(len(parts[0]), len(parts[1])) > MAX_HUB_NAME_CHARS:
        return f"a hub owner or repo name is at most {MAX_HUB_NAME_CHARS} characters"
    if len(parts) < 2 or not all(
        _HUB_NAME.fullmatch(p) and "--" not in p and ".." not in p for p in parts[:2]
    ):
        return f"a hub id is {HUB_ID_FORMS}"
    if len(parts) == 2:
        return ""
    if any(p in ("", ".", "..") or "\\" in p for p in parts[2:]):
        return f"{'/'.join(parts[2:])!r} is not a file path inside hub repo {'/'.join(parts[:2])!r}"
    if not parts[-1].lower().endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES):
        return (
            f"a file of a hub repo must be weights ending in {', '.join(SAFE_SUFFIXES)} (or, "
            f"with pickled weights allowed, {', '.join(PICKLE_SUFFIXES)}), got {parts[-1]!r}"
        )
    return ""


def split_hub_id(name: str) -> tuple[str, str]:
    """(repo, file) of a hub id: ("owner/name", "") for a whole repo, ("owner/name",
    "path/file.safetensors") for one file of it; ValueError naming ``name`` otherwise."""
    problem = hub_id_problem(name)
    if problem:
        raise ValueError(f"{shown(name)} is not a hub id: {problem}")
    owner, repo, *path = name.split("/")
    return f"{owner}/{repo}", "/".join(path)


def round_to_8(value: float, lo: int = 64, hi: int = MAX_SIDE) -> int:
    """``value`` rounded to the nearest multiple of 8 within [lo, hi]."""
    return int(min(hi, max(lo, 8 * round(float(value) / 8))))


def resolve_size(
    width: int | None, height: int | None, aspect: float, native_side: int
) -> tuple[int, int]:
    """The job size: given sides kept, missing ones from ``aspect`` (width / height).

    Neither given: about native_side**2 pixels (the model's native count) at ``aspect``,
    multiples of 8; 16:9 on SD 1.x (native 512) gives 680x384.
    """
    if aspect <= 0 or not math.isfinite(aspect):
        raise ValueError(f"aspect must be a positive number, got {aspect}")
    if width is not None and height is not None:
        return width, height
    if width is not None:
        return width, round_to_8(width / aspect)
    if height is not None:
        return round_to_8(height * aspect), height
    root = math.sqrt(aspect)
    return round_to_8(native_side * root), round_to_8(native_side / root)


def resolve_t0_t1(steps: int, t0: int | None = None, t1: int | None = None) -> tuple[int, int]:
    """t0/t1 for ``steps`` DDIM steps: given ones checked, missing ones scaled from 44/47 of 50.

    Counted as in the official code: frame 1 alone runs ``steps - t1 - 1`` steps to reach
    x_t1 and ``t1 - t0`` more to reach x_t0; all frames then run the last ``t1 + 1`` steps.
    The scaling keeps the fraction of the schedule spent before t1 and t0 (2/50 and 5/50).
    """
    if steps < 2:
        raise JobError(
            "steps",
            f"text2video needs at least 2 steps for motion dynamics (t0 < t1 < steps), got {steps}",
        )
    if t1 is None:
        before_t1 = round(steps * (DEFAULT_T_STEPS - DEFAULT_T1 - 1) / DEFAULT_T_STEPS)
        t1 = steps - 1 - before_t1
        if t0 is not None and t1 <= t0:
            t1 = min(steps - 1, t0 + 1)
    if t0 is None:
        before_t0 = round(steps * (DEFAULT_T_STEPS - DEFAULT_T0 - 1) / DEFAULT_T_STEPS)
        t0 = min(steps - 1 - before_t0, t1 - 1)
    if not 1 <= t1 <= steps - 1:
        raise JobError("t1", f"must be between 1 and steps - 1 = {steps - 1}, got {t1}")
    if not 0 <= t0 < t1:
        raise JobError("t0", f"must be at least 0 and below t1 = {t1}, got {t0}")
    return t0, t1


def validate_job(data: Any) -> Job:
    """Check a job dict (parsed JSON) and return the Job; raise JobError naming the field."""
    _check_type("job", data, dict)
    _no_unknown("", data, Job)
    for required in ("prompt", "out"):
        if required not in data:
            raise JobError(required, "is required")
    d = dict(data)

    version = _int("version", d.get("version", SCHEMA_VERSION))
    if version != SCHEMA_VERSION:
        raise JobError("version", f"this backend reads job schema {SCHEMA_VERSION}, got {version}")
    mode = _choice("mode", d.get("mode", "text2video"), MODES)
    default_model = DEFAULT_PIX2PIX_MODEL if mode == "pix2pix" else DEFAULT_MODEL
    frames = _int("frames", d.get("frames", 8), lo=1, hi=MAX_FRAMES)
    width, height = d.get("width"), d.get("height")
    for name, side in (("width", width), ("height", height)):
        if side is not None:
            _int(name, side, lo=64, hi=MAX_SIDE)
            if side % 8:
                raise JobError(name, f"must be divisible by 8, got {side}")
    steps = _int("steps", d.get("steps", 50), lo=1, hi=MAX_STEPS)

    frame_range = d.get("frame_range")
    if frame_range is not None:
        _check_type("frame_range", frame_range, (list, tuple))
        if len(frame_range) != 2:
            raise JobError("frame_range", f"expected [first, last], got {shown(frame_range)}")
        first = _int("frame_range[0]", frame_range[0], lo=1, hi=frames)
        last = _int("frame_range[1]", frame_range[1], lo=1, hi=frames)
        if first > last:
            raise JobError("frame_range", f"first must not exceed last, got {first}:{last}")
        frame_range = [first, last]

    motion = d.get("motion")
    if motion is not None:
        _check_type("motion", motion, (list, tuple))
        if len(motion) != 2:
            raise JobError("motion", f"expected [dx, dy], got {shown(motion)}")
        motion = [_float(f"motion[{i}]", v, lo=-512.0, hi=512.0) for i, v in enumerate(motion)]

    t0 = d.get("t0")
    t1 = d.get("t1")
    if t0 is not None:
        _int("t0", t0, lo=0)
    if t1 is not None:
        _int("t1", t1, lo=1)

    controlnets_raw = d.get("controlnets", [])
    _check_type("controlnets", controlnets_raw, (list, tuple))
    controlnets = [_controlnet(f"controlnets[{i}]", c) for i, c in enumerate(controlnets_raw)]

    loras, embeddings = _adapters(d)
    video = d.get("video")
    video = None if video is None else _video("video", video)
    masks = d.get("masks")
    masks = None if masks is None else _video("masks", masks)
    model_config = d.get("model_config")
    if model_config is not None:
        _str("model_config", model_config, nonempty=True)
    prediction_type = d.get("prediction_type")
    if prediction_type is not None:
        _choice("prediction_type", prediction_type, PREDICTION_TYPES)
    flow_source = d.get("flow_source")
    if flow_source is not None:
        _str("flow_source", flow_source, nonempty=True)

    job = Job(
        prompt=_str("prompt", d["prompt"], max_chars=MAX_PROMPT_CHARS),
        out=_str("out", d["out"], nonempty=True),
        mode=mode,
        model=_str("model", d.get("model", default_model), nonempty=True),
        model_config=model_config,
        prediction_type=prediction_type,
        negative_prompt=_str(
            "negative_prompt", d.get("negative_prompt", ""), max_chars=MAX_PROMPT_CHARS
        ),
        frames=frames,
        width=width,
        height=height,
        fit=_choice("fit", d.get("fit", "crop"), FITS),
        steps=steps,
        guidance=_float("guidance", d.get("guidance", 7.5), lo=0.0, hi=100.0),
        seed=_int("seed", d.get("seed", 0), lo=0, hi=2**63 - 1),
        chunk_size=_int("chunk_size", d.get("chunk_size", 8), lo=1, hi=MAX_FRAMES),
        frame_range=frame_range,
        motion=motion,
        t0=t0,
        t1=t1,
        smooth_bg=_check_type("smooth_bg", d.get("smooth_bg", False), bool),
        smooth_alpha=_float("smooth_alpha", d.get("smooth_alpha", 0.6), lo=0.0, hi=1.0),
        masks=masks,
        consistency=_choice("consistency", d.get("consistency", "paper"), CONSISTENCIES),
        flow_source=flow_source,
        controlnets=controlnets,
        loras=loras,
        embeddings=embeddings,
        video=video,
        image_guidance=_float("image_guidance", d.get("image_guidance", 1.5), lo=0.0, hi=100.0),
        device=_choice("device", d.get("device", "auto"), DEVICES),
        dtype=_choice("dtype", d.get("dtype", "auto"), DTYPES),
        fps=_float("fps", d.get("fps", 8.0), lo=0.1, hi=1000.0),
        write_mp4=_check_type("write_mp4", d.get("write_mp4", True), bool),
        save_latents=_check_type("save_latents", d.get("save_latents", False), bool),
        compile=_check_type("compile", d.get("compile", False), bool),
        allow_pickle=_check_type("allow_pickle", d.get("allow_pickle", False), bool),
        family=None if d.get("family") is None else _choice("family", d["family"], FAMILIES),
        version=version,
    )
    _check_mode(job)
    return job


def _check_mode(job: Job) -> None:
    """Cross-field rules: what each mode needs and refuses."""
    if job.mode == "text2video":
        job.t0, job.t1 = resolve_t0_t1(job.steps, job.t0, job.t1)
        if job.controlnets:
            raise JobError("controlnets", "text2video takes no ControlNets; use mode controlnet")
        if job.video is not None:
            raise JobError("video", "text2video takes no source video; use mode pix2pix")
    elif job.mode == "controlnet":
        if not job.controlnets:
            raise JobError("controlnets", "controlnet mode needs at least one ControlNet")
        if job.video is not None:
            raise JobError("video", "controlnet mode takes its videos as controlnets[].control")
        if job.motion is not None and any(job.motion):
            job.t0, job.t1 = resolve_t0_t1(job.steps, job.t0, job.t1)
        elif job.t0 is not None or job.t1 is not None:
            raise JobError("t0", "t0/t1 apply only with motion; set motion or leave t0/t1 unset")
    elif job.mode == "pix2pix":
        if job.video is None:
            raise JobError("video", "pix2pix needs a source video")
        if job.controlnets:
            raise JobError("controlnets", "pix2pix takes no ControlNets")
        if job.motion is not None and any(job.motion):
            raise JobError("motion", f"pix2pix follows its source video; got motion {job.motion}")
        if job.t0 is not None or job.t1 is not None:
            raise JobError("t0", "t0/t1 apply only to motion dynamics, not pix2pix")
        if job.smooth_bg:
            raise JobError(
                "smooth_bg",
                "background smoothing is for text2video and controlnet: pix2pix follows its "
                "moving source video, which a blend toward frame 1 would freeze",
            )
    if job.masks is not None and not job.smooth_bg:
        raise JobError("masks", "masks are used for background smoothing; set smooth_bg too")
    _check_consistency(job)


def _check_consistency(job: Job) -> None:
    """Flow consistency needs a mode with an input video and somewhere to get the motion."""
    if job.consistency == "paper":
        if job.flow_source is not None:
            raise JobError(
                "flow_source", f'applies only with consistency "flow", got {job.flow_source!r}'
            )
        return
    if job.mode == "text2video":
        raise JobError(
            "consistency",
            '"flow" follows an input video\'s motion: use it with controlnet or pix2pix',
        )
    keypoints_only = all(c.control.path.lower().endswith(".json") for c in job.controlnets)
    if job.flow_source in (None, FLOW_ESTIMATE) and job.mode == "controlnet" and keypoints_only:
        raise JobError(
            "flow_source",
            "OpenPose keypoint files have no pixels to estimate motion from: give a "
            "folder of motion-vector frames, or a control video",
        )


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """A named look: job fields it fills when the user leaves them out, shown, never hidden.

    The prompt words are appended to the user's prompt (``prompt, added``) and the negative
    prompt fills an empty one, so the job (and job.json) holds the final prompts.
    """

    name: str
    label: str  # for menus
    description: str  # one line: where the values come from
    mode: str  # the mode the preset is made for; a job of another mode is refused
    # Job fields filled when not given (never prompt or negative_prompt: see below).
    fields: dict[str, Any] = field(default_factory=dict)
    added_prompt: str = ""  # appended to the prompt after ", "
    negative_prompt: str = ""  # used when the job's negative prompt is empty


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="official-controlnet",
            label="Official ControlNet look",
            description="Text2Video-Zero's ControlNet demo: 20 steps, guidance 9, its added "
            "and negative prompts",
            mode="controlnet",
            fields={"steps": 20, "guidance": 9.0},
            added_prompt="best quality, extremely detailed",
            negative_prompt="longbody, lowres, bad anatomy, bad hands, missing fingers, "
            "extra digit, fewer digits, cropped, worst quality, low quality",
        ),
        Preset(
            name="official-text2video",
            label="Official text-to-video look",
            description="Text2Video-Zero's text-to-video demo: its added prompt (steps, "
            "guidance, motion and t0/t1 are already the official defaults)",
            mode="text2video",
            added_prompt="high quality, HD, 8K, trending on artstation, high focus, "
            "dramatic lighting",
        ),
        Preset(
            name="sdxl",
            label="SDXL look",
            description="An SDXL model's usual settings: 30 DDIM steps, guidance 6 (SDXL "
            "follows the prompt at lower guidance than SD 1.x)",
            mode="text2video",
            fields={"steps": 30, "guidance": 6.0},
        ),
        Preset(
            name="sdxl-controlnet",
            label="SDXL ControlNet look",
            description="SDXL ControlNets' usual settings: 30 DDIM steps, guidance 5 "
            "(diffusers' SDXL ControlNet default)",
            mode="controlnet",
            fields={"steps": 30, "guidance": 5.0},
        ),
    )
}


def with_added_prompt(prompt: str, added: str) -> str:
    """``prompt, added``; unchanged when ``added`` is empty or the prompt already ends with it."""
    if not added or prompt.rstrip().endswith(added):
        return prompt
    return f"{prompt.rstrip().rstrip(',')}, {added}" if prompt.strip() else added


def apply_preset(job: dict[str, Any], name: str) -> dict[str, Any]:
    """A copy of the (unvalidated) job dict with preset ``name`` filling what it leaves out."""
    if name not in PRESETS:
        raise JobError("preset", f"must be one of {', '.join(PRESETS)}, got {name!r}")
    preset = PRESETS[name]
    out = dict(job)
    mode = out.setdefault("mode", preset.mode)
    if mode != preset.mode:
        raise JobError("preset", f"{name} is made for mode {preset.mode}, the job is {mode!r}")
    for key, value in preset.fields.items():
        out.setdefault(key, value)
    if isinstance(out.get("prompt"), str):
        out["prompt"] = with_added_prompt(out["prompt"], preset.added_prompt)
    if not out.get("negative_prompt"):
        out["negative_prompt"] = preset.negative_prompt
    return out


# --------------------------------------------------------------------------- messages

# Requests (add-on -> worker): {"type": "generate", "id": str, "job": {...}},
# {"type": "cancel", "id": str}, {"type": "shutdown"}. A generate request may carry
# "allow_pickle": true, which the add-on sets from its preference: it sits outside the job
# because a job's own allow_pickle field (a job file anyone could write) enables nothing.
# For the hub model cache:
#   fetch_model   {"id", "model", "kind"?, "allow_pickle"?}   download a hub id ahead of the
#                                   first job (queued like a job; ``cancel`` with its id stops
#                                   it). kind (FETCH_KINDS): "model" (default) or "controlnet"
#                                   fetch what the model loaders read, "lora" or "embedding"
#                                   the adapter's one weight file; "model" may be a repo
#                                   (owner/name) or one file of it
#                                   (owner/name/path/file.safetensors; a pickled suffix
#                                   only with allow_pickle)
#   list_models   {"id"}            the models in the worker's hub cache (answered at once)
#   remove_model  {"id", "model"}   delete a model from that cache (queued)
# To check a detector before generating (DetectorPreview, validate_detector_preview):
#   preview_detector {"id", "control", "detector", "frame", "width", "height", "fit"?,
#                     "detector_models"?, "allow_pickle"?}   run ``detector`` on output frame
#                                   ``frame`` (0-based) of the control video ``control`` (a
#                                   path or {path, start, stride, indices}, as in a job) fitted
#                                   to width x height; queued like a job (its weights may
#                                   download: ``download`` replies, ``cancel`` stops it)
#   cluster_info  {"id", "cluster": {"address", "token"?}?}   the Ray cluster's GPUs (its own
#                                   thread; a clear error within 15 s when it is unreachable).
#                                   A generate request may carry "cluster" {"address",
#                                   "token"?, "shard_size"?} too: its frames run there
#                                   ("address": "" runs it in the worker; no field: the
#                                   worker's own --cluster)
REQUESTS = (
    "generate",
    "cancel",
    "shutdown",
    "fetch_model",
    "list_models",
    "remove_model",
    "preview_detector",
    "cluster_info",
)
# What a fetch_model request downloads ("kind"): the model loaders' files or an adapter's.
FETCH_KINDS = ("model", "controlnet", "lora", "embedding")
# Replies (worker -> add-on), one JSON object per stdout line:
#   ready      {"version", "pid"}                       once, when the worker starts
#   accepted   {"id"}                                   the job passed validation
#   download   {"id", "model", "file", "bytes_done", "bytes_total", "rate", "files_done",
#               "files_total"}                          a hub model downloading for job or
#                                                     fetch ``id``: bytes of all the files
#                                                     it needs (cached ones count as done),
#                                                     rate in bytes/s, at most 4 a second
#   progress   {"id", "step", "total", "frames_done", "frames_total", "fraction", "stage"}
#   preview    {"id", "frame", "path"}                  a frame on disk: finished, or frame 1
#                                                     forming while denoising (valid until done)
#   done       {"id", "out", "frames": [paths]}
#   fetched    {"id", "model", "path"}                  fetch_model finished: its local folder
#                                                     (a file's or an adapter's: the file)
#   models     {"id", "cache_dir", "models": [{"model", "size", "files", "last_accessed",
#               "complete", "path"}]}                  list_models: size in bytes, largest first
#   removed    {"id", "model", "freed"}                 remove_model: bytes freed
#   detected   {"id", "detector", "frame", "path"}      preview_detector: the control image,
#                                                     a PNG in the worker's temporary folder
#                                                     (its last few are kept)
#   cluster    {"id", "address", "gpus", "free_gpus", "cpus", "nodes": [{"host", "address",
#               "gpus", "cpus"}]}                      cluster_info's answer
#   error      {"id", "kind", "message", "traceback"}   kind: the exception's class name
#   cancelled  {"id"}                                   a job or fetch_model stopped
REPLIES = (
    "ready",
    "accepted",
    "download",
    "progress",
    "preview",
    "done",
    "fetched",
    "models",
    "removed",
    "detected",
    "cluster",
    "error",
    "cancelled",
)
# Requests the worker runs one at a time, in order (the others act at once).
QUEUED_REQUESTS = ("generate", "fetch_model", "remove_model", "preview_detector")


@dataclass
class DetectorPreview:
    """A preview_detector request: one frame of a control video through a detector."""

    control: VideoInput
    detector: str
    # 0-based output frame: the control's start/stride/indices pick the source frame.
    frame: int
    # The job's size and fit: the preview is the control image the job would get.
    width: int
    height: int
    fit: str = "crop"
    detector_models: dict[str, str] | None = None


# Fields of a preview_detector request besides DetectorPreview's.
_MESSAGE_FIELDS = ("type", "id", "allow_pickle")


def validate_detector_preview(message: Any) -> DetectorPreview:
    """Check a preview_detector request; JobError naming the field and the value."""
    _check_type("preview_detector", message, dict)
    _no_unknown("", {k: v for k, v in message.items() if k not in _MESSAGE_FIELDS}, DetectorPreview)
    for required in ("control", "detector", "frame", "width", "height"):
        if required not in message:
            raise JobError(required, "is required")
    return DetectorPreview(
        control=_video("control", message["control"]),
        detector=_choice("detector", message["detector"], DETECTORS),
        frame=_int("frame", message["frame"], lo=0, hi=MAX_FRAMES - 1),
        width=_int("width", message["width"], lo=8, hi=MAX_SIDE),
        height=_int("height", message["height"], lo=8, hi=MAX_SIDE),
        fit=_choice("fit", message.get("fit", "crop"), FITS),
        detector_models=_detector_models("", message),
    )


def encode_message(kind: str, /, **payload: Any) -> str:
    """One protocol line (no trailing newline) for a message of ``kind``.

    ``kind`` is positional-only: error replies carry a ``kind`` field of their own.
    """
    if kind not in REQUESTS and kind not in REPLIES:
        raise ValueError(f"unknown message type {kind!r}")
    return json.dumps({"type": kind, **payload}, separators=(",", ":"))


def parse_json(data: str | bytes, what: str, excerpt: bool = True) -> Any:
    """Parse JSON text (or UTF-8 bytes) of at most MAX_LINE_BYTES; ValueError saying why not.

    Never raises anything else: invalid UTF-8, nesting too deep for the parser and
    oversized input all become a ValueError whose message shows at most a short excerpt,
    and none with ``excerpt=False`` (a user's file that is not JSON may be anything: a
    private key given by mistake must not end up in a terminal or a log).
    """
    if len(data) > MAX_LINE_BYTES:
        raise ValueError(f"{what} is {len(data)} bytes long; the limit is {MAX_LINE_BYTES}")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{what} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to parse") from None
    except ValueError as exc:  # JSONDecodeError
        shown_data = f": {shown(data)}" if excerpt else ""
        raise ValueError(f"{what} is not JSON ({exc}){shown_data}") from None


def decode_message(line: str | bytes) -> dict[str, Any]:
    """Parse one protocol line; raise ValueError on anything that is not a known message."""
    message = parse_json(line, "protocol line")
    if not isinstance(message, dict) or message.get("type") not in REQUESTS + REPLIES:
        raise ValueError(f"not a protocol message: {shown(message)}")
    message_id = message.get("id")
    if message_id is not None and (
        isinstance(message_id, bool) or not isinstance(message_id, (str, int))
    ):
        raise ValueError(f"message id must be a string, got {shown(message_id)}")
    return message


# --------------------------------------------------------------------------- staging folders

# A result NAME is written into ".NAME.partial-HOST-PID-TOKEN" beside it and renamed when it
# is complete. HOST and PID name the writing process, so a folder left by a process that was
# killed (SIGKILL, the OOM killer, a power cut) can be told from one still being written and
# swept; folders of other machines (a shared render folder) are never touched. HOST is the
# host name AND a tag of this boot of this machine (``boot_tag``): two machines with the
# same host name (cloned VMs, containers) share a disk, and a PID means something only on
# the running system that issued it.
_PARTIAL = re.compile(
    r"^\.(?P<name>.+)\.partial-(?P<host>\w*)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})$"
)


def _boot_identity() -> str:
    """Text unique to this boot of this machine, or "" where none can be read."""
    try:  # Linux: a random UUID the kernel draws at every boot
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        pass
    if sys.platform == "darwin":  # a UUID per boot session
        import subprocess

        try:
            return subprocess.run(
                ["/usr/sbin/sysctl", "-n", "kern.bootsessionuuid"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    if os.name == "nt":  # the boot time to the second, with the machine's name
        import ctypes

        uptime = ctypes.windll.kernel32.GetTickCount64
        uptime.restype = ctypes.c_ulonglong
        return f"{socket.gethostname()}@{round(time.time() - uptime() / 1000)}"
    return ""


@functools.lru_cache(maxsize=1)
def boot_tag() -> str:
    """8 hex digits naming this boot of this machine, or "" where that cannot be known."""
    identity = _boot_identity()
    return hashlib.sha256(identity.encode()).hexdigest()[:8] if identity else ""


def host_tag() -> str:
    """This machine's name and boot as they appear in staging folder names (letters, digits,
    _): ``HOSTNAME_BOOTTAG``."""
    host = re.sub(r"\W", "_", socket.gethostname(), flags=re.ASCII)[:32]
    return f"{host}_{boot_tag()}" if boot_tag() else host


def partial_name(out_name: str, pid: int | None = None) -> str:
    """The staging folder name for result ``out_name`` written by process ``pid`` (this one)."""
    pid = os.getpid() if pid is None else pid
    return f".{out_name}.partial-{host_tag()}-{pid}-{uuid.uuid4().hex[:8]}"


def partial_owner(folder_name: str) -> tuple[str, int] | None:
    """(host, pid) of the process writing a staging folder; None for any other name."""
    match = _PARTIAL.match(folder_name)
    return (match["host"], int(match["pid"])) if match else None


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` runs on this machine (when in doubt: True, keep the folder)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _windows_pid_alive(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.OpenProcess.restype = ctypes.c_void_p  # a HANDLE is pointer-sized
    kernel32.OpenProcess.argtypes = (ctypes.c_ulong, ctypes.c_int, ctypes.c_ulong)
    kernel32.GetExitCodeProcess.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong))
    kernel32.CloseHandle.argtypes = (ctypes.c_void_p,)
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        # ERROR_INVALID_PARAMETER: no such process; anything else (access denied): it exists
        return ctypes.get_last_error() != 87
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Staging folders in ``folder`` left by processes of this boot of this machine that are
    gone; none where this system's boot cannot be told (see ``boot_tag``)."""
    if not boot_tag():
        return []  # a dead-looking PID could be a live process of another machine
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    host = host_tag()
    stale = []
    for entry in entries:
        owner = partial_owner(entry.name)
        if owner is None or owner[0] != host or not entry.is_dir(follow_symlinks=False):
            continue
        if owner[1] != os.getpid() and not pid_alive(owner[1]):
            stale.append(Path(entry.path))
    return sorted(stale)


def sweep_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete the stale staging folders in ``folder``; return those that are gone now."""
    removed = []
    for path in stale_partials(folder):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed
