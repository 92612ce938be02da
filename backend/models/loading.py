"""Loading models as users have them: hub ids, local diffusers folders, single-file checkpoints.

A hub id names a whole diffusers repo (owner/name) or one checkpoint file in a repo
(owner/name/path/file.safetensors): that file is downloaded alone and then loads exactly like
a local single-file checkpoint. A local path that exists always wins over a hub id.

Weights load from safetensors; pickled ``.ckpt``/``.bin``/``.pt`` weights are refused
unless the user allows them (``--allow-pickle`` or the add-on preference), because
unpickling runs arbitrary code. A local path never touches the network. Loaded models are
cached by ``ModelCache`` so a worker serving several jobs loads each model once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..protocol import (
    PICKLE_SUFFIXES,
    PREDICTION_TYPES,
    SAFE_SUFFIXES,
    file_prediction_type,
    hub_id_problem,
    shown,
    split_hub_id,
)
from .families import (
    SD1,
    SD_SCHEDULER,
    SDXL,
    Family,
    ddim_config,
    family_from_file,
    family_from_folder,
    family_from_unet_config,
    family_of_location,
    single_file_config_repo,
    zeros_for_empty_negative,
)
from .hub import (
    PICKLE_SWITCHES,
    DownloadHooks,
    HubError,
    cached_snapshot,
    fetch_model,
    pickle_refusal,
)
from .safety import (
    NO_REMOTE_CODE,
    ModelFileError,
    adapter_like,
    check_config_folder,
    forbid_remote_code,
    read_safetensors_header,
)
from .tiny import BUILTIN_PREFIX, ensure_builtin

log = logging.getLogger(__name__)

# Stable Diffusion 1.5's ControlNet architecture (ControlNetModel.from_unet of SD 1.5's
# UNet, 361 M parameters): the config a single-file ControlNet loads with unless given
# another, so a local .safetensors never needs the network.
SD15_CONTROLNET_CONFIG = Path(__file__).resolve().parent / "configs" / "sd15-controlnet"
# SDXL's ControlNet architecture (ControlNetModel.from_unet of SDXL base's UNet, 1.25 B
# parameters, as diffusers/controlnet-canny-sdxl-1.0): an SDXL single file's default config.
SDXL_CONTROLNET_CONFIG = Path(__file__).resolve().parent / "configs" / "sdxl-controlnet"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says which and what to do."""


@dataclass
class BaseModel:
    """The Stable Diffusion components the engine runs (SD 1.x, 2.x or SDXL: ``family``)."""

    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler_config: dict
    source: str
    device: torch.device
    dtype: torch.dtype
    # SDXL's second tokenizer and text encoder (OpenCLIP-bigG with its projection).
    tokenizer_2: Any = None
    text_encoder_2: Any = None
    # Read from the model itself when not given (families.family_from_unet_config).
    family: Family | None = None
    # An empty negative prompt encodes as zeros (SDXL's force_zeros_for_empty_prompt).
    zero_empty_negative: bool | None = None

    def __post_init__(self) -> None:
        if self.family is None:
            self.family = (
                SDXL
                if self.text_encoder_2 is not None
                else (family_from_unet_config(dict(self.unet.config)))
            )
        if self.zero_empty_negative is None:
            self.zero_empty_negative = self.family.zero_empty_negative

    @property
    def in_channels(self) -> int:
        """4 for text-to-image models, 8 for InstructPix2Pix-style models."""
        return int(self.unet.config.in_channels)

    def pipeline_components(self) -> dict[str, Any]:
        """Keyword arguments for a diffusers SD pipeline on these components (DDIM, no checker)."""
        from diffusers import DDIMScheduler

        components = {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "unet": self.unet,
            "scheduler": DDIMScheduler.from_config(self.scheduler_config),
        }
        if self.text_encoder_2 is not None:  # diffusers' SDXL pipelines
            return {
                **components,
                "text_encoder_2": self.text_encoder_2,
                "tokenizer_2": self.tokenizer_2,
                "force_zeros_for_empty_prompt": bool(self.zero_empty_negative),
            }
        return {
            **components,
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


# --------------------------------------------------------------------------- device


def resolve_device(name: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU for "auto"; otherwise the named device, checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device cuda was asked for, but this PyTorch build sees no CUDA GPU")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ModelLoadError("device mps was asked for, but Apple MPS is not available here")
    return torch.device(name)


# CPU flags (Linux /proc/cpuinfo names) of native bf16 matrix math: Intel AMX and AVX-512
# BF16. Without them oneDNN emulates bf16 and it runs slower than fp32. Vendor names do not
# decide: an AMD EPYC Zen 4 has avx512_bf16, an older Xeon has neither.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a job runs in and why (written to run.json)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        """The dtype's name: float32, bfloat16 or float16."""
        return str(self.dtype).replace("torch.", "")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU feature flags the kernel reports (Linux), or None where they cannot be read.

    torch's own queries do not say "native": ``torch.backends.cpu.get_cpu_capability()``
    stops at "AVX512", and ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is also true on
    AVX-512 CPUs that only emulate bf16.
    """
    try:
        text = Path(cpuinfo).read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, ARM
            return frozenset(value.split())
    return None


def native_bf16_flags(flags: frozenset[str] | None) -> list[str]:
    """The flags of NATIVE_BF16_FLAGS the CPU has (empty: bf16 would be emulated or unknown)."""
    return [f for f in NATIVE_BF16_FLAGS if flags and f in flags]


def cpu_auto_dtype(flags: frozenset[str] | None) -> DtypeChoice:
    """Auto dtype on the CPU: bfloat16 with native bf16 math, else (or flags unknown) float32."""
    # Native bf16 (AMX): an SD 1.5 UNet forward 1.51x faster than fp32, 1.2 % relative
    # error. Emulated bf16 (and fp16) on a CPU without it is slower than fp32.
    if flags is None:
        return DtypeChoice(torch.float32, "auto: CPU flags unreadable here, float32")
    native = native_bf16_flags(flags)
    if native:
        return DtypeChoice(torch.bfloat16, f"auto: CPU has native bf16 ({', '.join(native)})")
    return DtypeChoice(
        torch.float32,
        f"auto: CPU has no native bf16 ({' or '.join(NATIVE_BF16_FLAGS)}), float32",
    )


def choose_dtype(name: str, device: torch.device) -> DtypeChoice:
    """The dtype for ``name`` on ``device`` and why (auto: fp16 on CUDA, CPU by its flags)."""
    if name != "auto":
        if name not in TORCH_DTYPES:
            raise ValueError(
                f"dtype must be auto or one of {', '.join(TORCH_DTYPES)}, got {name!r}"
            )
        return DtypeChoice(TORCH_DTYPES[name], f"{name} was asked for")
    if device.type == "cuda":
        return DtypeChoice(torch.float16, "auto: float16 on CUDA")
    if device.type != "cpu":
        return DtypeChoice(torch.float32, f"auto: float32 on {device.type}")
    return cpu_auto_dtype(cpu_flags())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype ``choose_dtype`` picks (bf16 on CPUs with native bf16 for "auto")."""
    return choose_dtype(name, device).dtype


# --------------------------------------------------------------------------- sources


def resolve_source(name: str) -> tuple[str, str]:
    """Classify a model name: ("folder"|"file"|"hub", location); builtins become folders.

    An existing local path wins; "hub" is a repo id or one file of a repo (see
    ``protocol.hub_id_problem``), anything else a ModelLoadError naming it.
    """
    if name.startswith(BUILTIN_PREFIX):
        try:
            return "folder", str(ensure_builtin(name))
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
    path = Path(os.path.expanduser(name))
    try:
        if path.is_dir():
            return "folder", str(path)
        if path.is_file():
            return "file", str(path)
    except OSError as exc:  # a name too long for a path (ENAMETOOLONG), a loop of links
        raise ModelLoadError(
            f"model {shown(name)} is not a usable path ({exc.strerror}) nor a hub id"
        ) from None
    problem = hub_id_problem(name)
    if problem:
        raise ModelLoadError(
            f"model {name!r} is neither an existing folder or file nor a hub id: {problem}"
        )
    return "hub", name


def _checked(check: Any, *args: Any) -> Any:
    """``check(*args)``, a safety.ModelFileError becoming a ModelLoadError (same message)."""
    try:
        return check(*args)
    except ModelFileError as exc:
        raise ModelLoadError(str(exc)) from None


def _check_pickle_file(path: str, allow_pickle: bool) -> None:
    suffix = Path(path).suffix.lower()
    if suffix in SAFE_SUFFIXES:
        _checked(read_safetensors_header, path)  # empty, truncated, header bomb: named here
        return
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelLoadError(pickle_refusal(path, suffix))
        return
    raise ModelLoadError(
        f"{path}: unknown checkpoint type {suffix!r}; expected .safetensors "
        f"(or {', '.join(PICKLE_SUFFIXES)} with --allow-pickle)"
    )


def _check_folder_weights(folder: Path, allow_pickle: bool) -> None:
    """Refuse a folder whose weights are only pickled, before diffusers tries to load them."""
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    has_safe = any(p.suffix == ".safetensors" for p in files)
    has_pickle = any(p.suffix in PICKLE_SUFFIXES for p in files)
    for path in files:
        if path.suffix == ".safetensors":
            _checked(read_safetensors_header, path)
    if not has_safe and has_pickle and not allow_pickle:
        raise ModelLoadError(
            f"{folder} holds only pickled weights (.bin/.ckpt): loading them can run arbitrary "
            "code. Convert them to .safetensors, or, if you trust their source, pass "
            f"--allow-pickle {PICKLE_SWITCHES}."
        )


def low_cpu_mem_usage() -> bool:
    """True when accelerate is installed: diffusers then loads weights straight into empty
    (meta) modules, with no random initialisation and no second copy of the weights."""
    return importlib.util.find_spec("accelerate") is not None


def _fetch(
    name: str, allow_pickle: bool, download: DownloadHooks | None, configs_only: bool = False
) -> str:
    """Download hub model ``name`` (with progress) and return its local snapshot folder, or
    the file's path for one file of a repo; ``configs_only``: just its configs and tokenizer
    (for a single-file checkpoint)."""
    try:
        return str(
            fetch_model(name, allow_pickle=allow_pickle, hooks=download, configs_only=configs_only)
        )
    except HubError as exc:
        raise ModelLoadError(str(exc)) from exc


def _local_source(name: str, allow_pickle: bool, download: DownloadHooks | None) -> tuple[str, str]:
    """("folder"|"file", local location) of model ``name``: a hub id is downloaded first (a
    repo into a snapshot folder, one file of a repo to that file)."""
    kind, location = resolve_source(name)
    if kind == "hub":
        location = _fetch(name, allow_pickle, download)
        kind = "file" if Path(location).is_file() else "folder"
    _check_source(kind, location)
    return kind, location


def _check_source(kind: str, location: str) -> None:
    """Refuse a folder whose configs ask for custom code or unknown classes, and a
    .safetensors file that is broken or is a LoRA or embedding, before any library reads it."""
    forbid_remote_code()  # whatever slips past: an error, never a prompt on stdin
    if kind == "folder":
        _checked(check_config_folder, location)
    elif Path(location).suffix.lower() in SAFE_SUFFIXES:
        adapter = adapter_like(_checked(read_safetensors_header, location))
        if adapter:
            switch = "--lora" if adapter == "LoRA" else "--embedding"
            raise ModelLoadError(
                f"{location} holds a {adapter}, not a model: give it with {switch} "
                "(or the add-on's LoRAs & Embeddings list) on top of a base model"
            )


def _config_folder(name: str, what: str, download: DownloadHooks | None) -> str:
    """The local diffusers folder of config source ``name`` (a folder, or a hub id whose
    configs are downloaded with progress and cancel, or found in the cache offline)."""
    kind, location = resolve_source(name)
    if kind == "file" or (kind == "hub" and split_hub_id(location)[1]):
        raise ModelLoadError(
            f"{what} must be a diffusers folder or hub id of a whole repo (owner/name), got {name}"
        )
    if kind == "hub":
        location = _fetch(location, False, download, configs_only=True)
    forbid_remote_code()
    _checked(check_config_folder, location)
    return location


def _pretrained_kwargs(kind: str, allow_pickle: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "use_safetensors": None if allow_pickle else True,
        # Without accelerate diffusers would warn on every load and fall back anyway.
        "low_cpu_mem_usage": low_cpu_mem_usage(),
    }
    if kind == "folder":
        kwargs["local_files_only"] = True
    return kwargs


def _wrap_load_error(name: str, allow_pickle: bool, exc: Exception) -> ModelLoadError:
    hint = "" if allow_pickle else " (if it has only pickled .bin weights, see --allow-pickle)"
    return ModelLoadError(f"could not load model {name!r}: {exc}{hint}")


def peek_family(name: str) -> Family | None:
    """The family of model ``name`` read without loading or downloading it: a local or
    built-in folder's configs, a local .safetensors file's tensor names, or a hub repo
    already in the cache; None when that cannot tell (a hub id not downloaded yet)."""
    try:
        kind, location = resolve_source(name)
    except ModelLoadError:
        return None
    if kind == "hub":
        if split_hub_id(name)[1]:
            return None
        snapshot = cached_snapshot(name)
        if snapshot is None:
            return None
        kind, location = "folder", str(snapshot)
    try:
        return family_of_location(kind, location)
    except (OSError, ValueError):  # an unreadable header: loading will say what is wrong
        return None


# --------------------------------------------------------------------------- loading


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a module for inference: device, dtype, eval mode.

    Weights stay in the default (contiguous) layout on every device: channels_last made SD
    1.5's float16 UNet 8 % slower on an H100 (``python -m bench.formats``, BENCHMARKS.md).
    """
    module.requires_grad_(False)
    module.eval()
    module.to(device)
    if module.dtype != dtype:  # from_pretrained already loaded in ``dtype``; convert only if not
        module.to(dtype)
    return module


def load_base_model(
    name: str,
    *,
    pix2pix: bool = False,
    config: str | None = None,
    allow_pickle: bool = False,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    download: DownloadHooks | None = None,
    prediction_type: str | None = None,
) -> BaseModel:
    """Load SD 1.x, 2.x or SDXL components from a hub id, a diffusers folder or a single-file
    checkpoint; the family is read from the model (``families``), never from its name.

    A hub id is first downloaded into the hub cache (progress and cancel through
    ``download``), then loaded from there like a local folder, or, for one checkpoint file of
    a repo, like a local single-file checkpoint (configs from ``config``, else the family's
    own configs repo). ``prediction_type`` (PREDICTION_TYPES) replaces the scheduler
    config's; None keeps the model's own (a single file's metadata hint, else its configs').
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ModelLoadError(
            f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}"
        )
    device = device or torch.device("cpu")
    kind, location = _local_source(name, allow_pickle, download)
    if kind == "file":
        _check_pickle_file(location, allow_pickle)
        components = _load_single_file(location, pix2pix, config, dtype, download, prediction_type)
    else:
        root = Path(location)
        if kind == "folder":
            if not (root / "unet" / "config.json").is_file():
                raise ModelLoadError(
                    f"{location} is not a diffusers model folder (no unet/config.json); "
                    "give a folder saved with save_pretrained, a .safetensors file or a hub id"
                )
            for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
                _check_folder_weights(root / sub, allow_pickle)
        kwargs = _pretrained_kwargs(kind, allow_pickle)
        # SDXL: a second tokenizer and text encoder (OpenCLIP-bigG, with its projection).
        second = (root / "text_encoder_2" / "config.json").is_file()
        try:
            components = {
                "tokenizer": CLIPTokenizer.from_pretrained(
                    location,
                    subfolder="tokenizer",
                    local_files_only=kind == "folder",
                    **NO_REMOTE_CODE,
                ),
                "text_encoder": CLIPTextModel.from_pretrained(
                    location,
                    subfolder="text_encoder",
                    torch_dtype=dtype,
                    **kwargs,
                    **NO_REMOTE_CODE,
                ),
                "unet": UNet2DConditionModel.from_pretrained(
                    location, subfolder="unet", torch_dtype=dtype, **kwargs
                ),
                "vae": AutoencoderKL.from_pretrained(
                    location, subfolder="vae", torch_dtype=dtype, **kwargs
                ),
                "scheduler_config": _scheduler_config(location, kind),
            }
            if second:
                components["tokenizer_2"] = CLIPTokenizer.from_pretrained(
                    location,
                    subfolder="tokenizer_2",
                    local_files_only=kind == "folder",
                    **NO_REMOTE_CODE,
                )
                components["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                    location,
                    subfolder="text_encoder_2",
                    torch_dtype=dtype,
                    **kwargs,
                    **NO_REMOTE_CODE,
                )
        except (OSError, ValueError) as exc:
            raise _wrap_load_error(name, allow_pickle, exc) from exc
        family = family_from_folder(location)
        components["family"] = family
        components["zero_empty_negative"] = zeros_for_empty_negative(location, family)
        if prediction_type is not None:
            components["scheduler_config"]["prediction_type"] = prediction_type
    text_encoder_2 = components.get("text_encoder_2")
    base = BaseModel(
        tokenizer=components["tokenizer"],
        text_encoder=_place(components["text_encoder"], device, dtype),
        unet=_place(components["unet"], device, dtype),
        vae=_place(components["vae"], device, dtype),
        scheduler_config=components["scheduler_config"],
        source=name,
        device=device,
        dtype=dtype,
        tokenizer_2=components.get("tokenizer_2"),
        text_encoder_2=None if text_encoder_2 is None else _place(text_encoder_2, device, dtype),
        family=components.get("family"),
        zero_empty_negative=components.get("zero_empty_negative"),
    )
    log.info(
        "%s: %s model, %s", name, base.family.label, base.scheduler_config.get("prediction_type")
    )
    if pix2pix and base.in_channels != 8:
        raise ModelLoadError(
            f"pix2pix needs an InstructPix2Pix model (UNet with 8 input channels); "
            f"{name!r} has {base.in_channels}"
        )
    if not pix2pix and base.in_channels != 4:
        raise ModelLoadError(
            f"{name!r} has a UNet with {base.in_channels} input channels; text2video and "
            "controlnet need a text-to-image model (4 channels)"
        )
    return base


def _scheduler_config(location: str, kind: str) -> dict:
    from diffusers import DDIMScheduler

    try:
        config = DDIMScheduler.load_config(
            location, subfolder="scheduler", local_files_only=kind == "folder"
        )
    except (OSError, ValueError):
        log.warning(
            "%s has no scheduler/ config; using Stable Diffusion 1.x's DDIM configuration "
            "(scaled_linear betas 0.00085..0.012, steps_offset 1, clip_sample off, "
            "set_alpha_to_one off)",
            location,
        )
        config = SD_SCHEDULER
    return ddim_config(dict(config))


def single_file_prediction_type(path: str, prediction_type: str | None) -> str | None:
    """The prediction type a single file runs with: the job's, else its safetensors
    metadata's (``protocol.PREDICTION_HINTS``), else None (its configs decide)."""
    if prediction_type is not None:
        return prediction_type
    hint = file_prediction_type(path)
    if hint is None:
        return None
    log.info("%s: %s, as its metadata's %s says", path, hint[0], hint[1])
    return hint[0]


def _load_single_file(
    path: str,
    pix2pix: bool,
    config: str | None,
    dtype: torch.dtype,
    download: DownloadHooks | None = None,
    prediction_type: str | None = None,
) -> dict:
    """Components of an original-format SD 1.x, 2.x or SDXL checkpoint through diffusers'
    single-file loader; the family from its tensor names (``families.family_from_file``).

    Its configs and tokenizer come from ``config`` (a folder, or a hub id fetched like a
    model, configs only; by default the family's own configs repo, for SD 2.x the 512 px
    epsilon one or the 768 px v-prediction one as ``prediction_type`` or the file's
    metadata says, v-prediction when neither does, as diffusers guesses), and diffusers
    reads them from that folder: no network of its own. The tensors cannot tell epsilon from
    v-prediction.
    """
    from diffusers import (
        StableDiffusionInstructPix2PixPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLInstructPix2PixPipeline,
        StableDiffusionXLPipeline,
    )

    family = family_from_file(path) or SD1  # a pickle is not opened to look: as before, SD 1.x
    if family.added_conditions:
        pipeline_cls = (
            StableDiffusionXLInstructPix2PixPipeline if pix2pix else StableDiffusionXLPipeline
        )
    else:
        pipeline_cls = (
            StableDiffusionInstructPix2PixPipeline if pix2pix else StableDiffusionPipeline
        )
    prediction_type = single_file_prediction_type(path, prediction_type)
    default = single_file_config_repo(family, pix2pix, prediction_type)
    if config is None and default is None:
        raise ModelLoadError(
            f"{path} is an {family.label} checkpoint and there is no default {family.label} "
            "InstructPix2Pix config: give --model-config / model_config a diffusers folder or "
            "hub id of its architecture"
        )
    config_name = config or default
    try:
        config_location = _config_folder(config_name, "model_config", download)
    except ModelLoadError as exc:
        raise ModelLoadError(f"configs for single-file checkpoint {path}: {exc}") from exc
    try:
        extra = {} if family.added_conditions else {
            "safety_checker": None, "requires_safety_checker": False
        }  # fmt: skip
        pipeline = pipeline_cls.from_single_file(
            path, config=config_location, torch_dtype=dtype, local_files_only=True, **extra
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"could not load single-file checkpoint {path} with configs from {config_name!r}: "
            f"{exc} (another architecture? give --model-config / model_config a diffusers "
            "folder or hub id of the same architecture)"
        ) from exc
    scheduler_config = ddim_config(dict(pipeline.scheduler.config))
    if prediction_type is not None:
        scheduler_config["prediction_type"] = prediction_type
    return {
        "tokenizer": pipeline.tokenizer,
        "text_encoder": pipeline.text_encoder,
        "unet": pipeline.unet,
        "vae": pipeline.vae,
        "scheduler_config": scheduler_config,
        "tokenizer_2": getattr(pipeline, "tokenizer_2", None),
        "text_encoder_2": getattr(pipeline, "text_encoder_2", None),
        "family": family,
        "zero_empty_negative": zeros_for_empty_negative(config_location, family),
    }


def load_controlnet(
    name: str,
    *,
    config: str | None = None,
    allow_pickle: bool = False,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    download: DownloadHooks | None = None,
) -> Any:
    """Load a ControlNet from a hub id (a repo, or one checkpoint file of a repo), a
    diffusers folder or a single-file checkpoint."""
    device = device or torch.device("cpu")
    kind, location = _local_source(name, allow_pickle, download)
    if kind == "file":
        _check_pickle_file(location, allow_pickle)
        controlnet = _load_single_file_controlnet(location, config, dtype, download)
        return _place(controlnet, device, dtype)
    if not (Path(location) / "config.json").is_file():
        raise ModelLoadError(f"{location} is not a diffusers ControlNet folder (no config.json)")
    _check_folder_weights(Path(location), allow_pickle)
    try:
        model = _controlnet_class(Path(location)).from_pretrained(
            location, torch_dtype=dtype, **_pretrained_kwargs(kind, allow_pickle)
        )
    except (OSError, ValueError) as exc:
        raise _wrap_load_error(name, allow_pickle, exc) from exc
    return _place(model, device, dtype)


def _controlnet_class(folder: Path) -> Any:
    """ControlNetUnionModel for a union ControlNet folder (one model, a control type per
    input), else ControlNetModel; read from its config's ``_class_name``."""
    from diffusers import ControlNetModel, ControlNetUnionModel

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ControlNetModel
    union = isinstance(config, dict) and config.get("_class_name") == "ControlNetUnionModel"
    return ControlNetUnionModel if union else ControlNetModel


def _load_single_file_controlnet(
    path: str, config: str | None, dtype: torch.dtype, download: DownloadHooks | None = None
) -> Any:
    """A ControlNet from one checkpoint file, its config from ``config`` (a diffusers
    ControlNet folder, or a hub id fetched like a model, configs only) or the shipped config
    of its family, read from its tensor names: SDXL's or SD 1.5's (no network)."""
    from diffusers import ControlNetModel

    family = family_from_file(path)
    shipped = SDXL_CONTROLNET_CONFIG if family is SDXL else SD15_CONTROLNET_CONFIG
    config_name = config or str(shipped)
    try:
        config_location = _config_folder(config_name, "a ControlNet config", download)
    except ModelLoadError as exc:
        raise ModelLoadError(f"configs for single-file ControlNet {path}: {exc}") from exc
    try:
        return ControlNetModel.from_single_file(
            path,
            config=config_location,
            local_files_only=True,
            torch_dtype=dtype,
            low_cpu_mem_usage=low_cpu_mem_usage(),
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        shipped_label = "SDXL" if family is SDXL else "SD 1.5"
        where = f"the {shipped_label} ControlNet config" if config is None else repr(config)
        raise ModelLoadError(
            f"could not load single-file ControlNet {path} with {where}: {exc} (a ControlNet "
            "of another architecture? give --controlnet-config / controlnets[].config a "
            "diffusers ControlNet folder of its architecture)"
        ) from exc


# --------------------------------------------------------------------------- cache


class ModelCache:
    """Keeps recently used models loaded so the next job starts denoising without reloading."""

    def __init__(self, max_bases: int = 1, max_controlnets: int = 4):
        self.max_bases = max_bases
        self.max_controlnets = max_controlnets
        self._bases: OrderedDict[tuple, BaseModel] = OrderedDict()
        self._controlnets: OrderedDict[tuple, Any] = OrderedDict()
        # Loaded detector models (openpose: RT-DETR + VitPose; depth: Depth Anything).
        self.max_detectors = 2
        self._detectors: OrderedDict[tuple, Any] = OrderedDict()
        self.loads = 0  # how many times a model was actually loaded (for tests and logs)

    def base(self, name: str, download: DownloadHooks | None = None, **kwargs: Any) -> BaseModel:
        """The base model ``name`` loaded with ``kwargs`` (see load_base_model), cached."""
        key = (name, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        return self._get(
            self._bases,
            key,
            self.max_bases,
            lambda: load_base_model(name, download=download, **kwargs),
        )

    def controlnet(self, name: str, download: DownloadHooks | None = None, **kwargs: Any) -> Any:
        """The ControlNet ``name`` loaded with ``kwargs`` (see load_controlnet), cached."""
        key = (name, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        return self._get(
            self._controlnets,
            key,
            self.max_controlnets,
            lambda: load_controlnet(name, download=download, **kwargs),
        )

    def detector(
        self,
        detector: str,
        models: dict[str, str],
        device: torch.device,
        download: DownloadHooks | None = None,
    ) -> Any:
        """Model detector ``detector`` with ``models`` by role (see detectors.load_detector)
        loaded on ``device``, cached."""
        from .detectors import load_detector

        key = (detector, tuple(sorted(models.items())), str(device))
        return self._get(
            self._detectors,
            key,
            self.max_detectors,
            lambda: load_detector(detector, models, device, download),
        )

    def _get(self, store: OrderedDict, key: tuple, limit: int, load: Any) -> Any:
        if key in store:
            store.move_to_end(key)
            return store[key]
        while len(store) >= limit:
            store.popitem(last=False)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        forbid_remote_code()  # every model a job loads (detectors too): no prompt, no code
        value = load()
        self.loads += 1
        store[key] = value
        return value
