"""Checks on model files from strangers, made before any library reads them.

A downloaded model folder, single-file checkpoint, LoRA or embedding is data, and these
checks keep it that way: a config that asks for custom Python code (``auto_map``) or names
a class outside the diffusers and transformers families we load is refused before anything
is imported; safetensors headers are checked against the file (empty, truncated and
header-bomb files are named instead of failing deep in a library); a config asking for an
absurd UNet is refused before memory is allocated for it; adapter tensors must be finite
and within float16 range. Every error is a ``ModelLoadError`` of one or two lines naming
the file (and the field or tensor).
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any


class ModelFileError(ValueError):
    """A model file is unsafe or broken; the message names the file and what is wrong."""


# --------------------------------------------------------------------------- remote code


def forbid_remote_code() -> None:
    """Make transformers refuse custom code instead of asking "run it? [y/N]" on stdin.

    transformers prompts only when ``trust_remote_code`` is left unset and its prompt
    timeout is positive; with the timeout at 0 (what its own CI uses) it raises ValueError.
    Our loaders pass ``trust_remote_code=False`` where they can; this covers the rest.
    """
    from transformers import dynamic_module_utils

    dynamic_module_utils.TIME_OUT_REMOTE_CODE = 0


# Keyword arguments for every transformers ``from_pretrained``: never the repo's own code.
NO_REMOTE_CODE = {"trust_remote_code": False}

# Config files transformers and diffusers read beside weights; any of them may carry an
# ``auto_map`` pointing at a .py file of the folder (custom code).
CONFIG_FILES = (
    "model_index.json",
    "config.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "feature_extractor_config.json",
    "scheduler_config.json",
)
# A config is a few KB (SD 1.5's largest, the tokenizer config, is under 1 KB); a bigger
# one is refused unread.
MAX_CONFIG_BYTES = 1 << 20
# Keys by which a config asks for code from the folder or a repo.
REMOTE_CODE_KEYS = ("auto_map", "custom_pipeline")

# The component classes a model_index.json may name, by library: the SD 1.x / 2.x / XL,
# InstructPix2Pix and ControlNet families. Schedulers: any diffusers *Scheduler class.
ALLOWED_COMPONENTS = {
    "diffusers": {"UNet2DConditionModel", "AutoencoderKL", "ControlNetModel"},
    "transformers": {
        "CLIPTextModel",
        "CLIPTextModelWithProjection",
        "CLIPTokenizer",
        "CLIPTokenizerFast",
        "CLIPImageProcessor",
        "CLIPFeatureExtractor",
        "CLIPVisionModelWithProjection",
    },
    # diffusers.pipelines.stable_diffusion: SD 1.x repos list their safety checker so.
    "stable_diffusion": {"StableDiffusionSafetyChecker"},
}
_SCHEDULER = re.compile(r"[A-Z][A-Za-z0-9]*Scheduler")


def read_config(path: Path) -> dict[str, Any]:
    """The JSON object of config file ``path`` (at most MAX_CONFIG_BYTES); ModelFileError
    naming it otherwise, with no excerpt of what it holds."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ModelFileError(f"{path} is not a regular file")
        if size > MAX_CONFIG_BYTES:
            raise ModelFileError(
                f"{path} is {size} bytes; a config is at most {MAX_CONFIG_BYTES} bytes"
            )
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ModelFileError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, RecursionError, json.JSONDecodeError):
        raise ModelFileError(f"{path} is not a JSON config") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} is not a JSON object")
    return data


def _config_files(folder: Path) -> list[Path]:
    """The config files of ``folder`` and of its subfolders (a diffusers repo's components)."""
    found = [folder / name for name in CONFIG_FILES if (folder / name).exists()]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        found += [sub / name for name in CONFIG_FILES if (sub / name).exists()]
    return found


def check_components(path: Path, index: dict[str, Any]) -> None:
    """ModelFileError naming the entry when model_index.json names a library or class
    outside ALLOWED_COMPONENTS (diffusers would import it by name: any installed module)."""
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue  # metadata (_class_name, _diffusers_version) and plain settings
        if len(value) != 2 or value == [None, None]:
            if value == [None, None]:
                continue  # a component left out (safety_checker: [null, null])
            raise ModelFileError(f"{path}: entry {name!r} is not [library, class]")
        library, cls = value
        allowed = ALLOWED_COMPONENTS.get(library) if isinstance(library, str) else None
        ok = allowed is not None and isinstance(cls, str) and cls in allowed
        if library == "diffusers" and isinstance(cls, str) and _SCHEDULER.fullmatch(cls):
            ok = True
        if not ok:
            shown = json.dumps(value)[:80]
            raise ModelFileError(
                f"{path}: entry {name!r} names {shown}, which is not a diffusers or "
                "transformers class of the Stable Diffusion families; refused before importing"
            )


def check_config_folder(folder: str | Path) -> None:
    """Refuse a model folder whose configs ask for custom code or name classes outside the
    supported families, or whose UNet / ControlNet config is absurdly large."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    configs = [(path, read_config(path)) for path in _config_files(folder)]
    for path, config in configs:  # custom code first: the file that asks for it is named
        for key in REMOTE_CODE_KEYS:
            if key in config:
                raise ModelFileError(
                    f"{path} asks for custom code ({key!r}): models that run their own "
                    "Python are refused; nothing of it was run"
                )
    for path, config in configs:
        if path.name == "model_index.json":
            check_components(path, config)
        if path.name == "config.json" and config.get("_class_name") in MODEL_SIZE_CLASSES:
            check_model_size(path, config)


# --------------------------------------------------------------------------- model size

# The largest UNet of the supported families is SDXL's, 2.57 G parameters (10.3 GB in
# float32); a config asking for more than 4 G is refused before memory is allocated.
MAX_UNET_PARAMS = 4_000_000_000
MODEL_SIZE_CLASSES = ("UNet2DConditionModel", "ControlNetModel", "ControlNetUnionModel")
# Layer counts beyond these take long even to build empty (SDXL: 2 and 10).
MAX_LAYER_COUNTS = {"layers_per_block": 8, "transformer_layers_per_block": 32}
MAX_BLOCKS = 8


def _ints(value: Any) -> list[int]:
    """Every int in a config value (an int or nested lists of them)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [i for v in value for i in _ints(v)]
    return []


def check_model_size(path: Path, config: dict[str, Any]) -> int:
    """The parameter count a UNet or ControlNet config asks for, counted on the meta device
    (no memory); ModelFileError naming the file and field when it is absurd."""
    import diffusers
    import torch

    for key, limit in MAX_LAYER_COUNTS.items():
        counts = _ints(config.get(key))
        if counts and (max(counts) > limit or min(counts) < 0):
            raise ModelFileError(f"{path}: {key} {max(counts)} is beyond the limit of {limit}")
    blocks = config.get("down_block_types") or []
    if isinstance(blocks, list) and len(blocks) > MAX_BLOCKS:
        raise ModelFileError(f"{path}: {len(blocks)} down blocks, beyond the limit of {MAX_BLOCKS}")
    cls = getattr(diffusers, str(config["_class_name"]))
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception as exc:  # noqa: BLE001 (diffusers' config checks raise several kinds)
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelFileError(f"{path} is not a valid {cls.__name__} config: {first}") from None
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_UNET_PARAMS:
        raise ModelFileError(
            f"{path} asks for a {cls.__name__} of {params / 1e9:.1f} G parameters "
            f"({params * 4 / 1e9:.0f} GB in float32); the limit is {MAX_UNET_PARAMS / 1e9:.0f} G "
            "(SDXL's UNet has 2.6 G): check block_out_channels and the layer counts"
        )
    return params


# --------------------------------------------------------------------------- safetensors

# Bytes per element of the safetensors dtypes.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# The safetensors library's own limit on a header (100 MB); SD 1.5's is 100 KB.
MAX_HEADER_BYTES = 100_000_000


def read_safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """The tensor table of safetensors file ``path`` ({name: {dtype, shape, data_offsets}}),
    checked against the file's size; ModelFileError naming the file and what is wrong
    (empty, truncated, a header claiming more than the file holds)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(
                    f"{path} is not a safetensors file: {size} bytes, too short for a header"
                )
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ModelFileError(
                    f"{path} is not a valid safetensors file: its header claims {length} "
                    f"bytes and the file has {size} (truncated or corrupt)"
                )
            raw = f.read(length)
    except OSError as exc:
        raise ModelFileError(f"{path} cannot be read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, RecursionError, json.JSONDecodeError):
        raise ModelFileError(
            f"{path} is not a valid safetensors file (unreadable header)"
        ) from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} is not a valid safetensors file (header is no table)")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - length
    for name, info in header.items():
        _check_entry(path, name, info, data_bytes)
    return header


def _check_entry(path: Path, name: str, info: Any, data_bytes: int) -> None:
    """ModelFileError when tensor ``name``'s entry is malformed or reaches past the file."""
    label = name if len(name) <= 80 else name[:77] + "..."
    try:
        dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        ok = dtype in DTYPE_BYTES and all(isinstance(d, int) and d >= 0 for d in shape)
        ok = ok and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ModelFileError(f"{path}: tensor {label!r} has a malformed entry in the header")
    if end > data_bytes:
        raise ModelFileError(
            f"{path} is truncated: tensor {label!r} ends at byte {end} of the data and the "
            f"file holds {data_bytes}"
        )
    if (end - start) != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise ModelFileError(f"{path}: tensor {label!r} has {end - start} bytes for {shape}")


def tensor_count(header: dict[str, dict[str, Any]]) -> int:
    """Elements in all the tensors of a safetensors header."""
    return sum(math.prod(info["shape"]) for info in header.values())


def adapter_like(header: dict[str, dict[str, Any]]) -> str:
    """ "LoRA" or "embedding" when a safetensors header holds only an adapter's tensors,
    else "" (a whole model)."""
    names = list(header)
    if names and sum("lora" in n.lower() for n in names) * 2 >= len(names):
        return "LoRA"
    if 0 < len(names) <= 4 and tensor_count(header) < 1_000_000:
        return "embedding"  # a model has hundreds of tensors; an embedding a few vectors
    return ""


# float16's largest finite value: a weight beyond it is inf in half precision, and a LoRA
# or embedding anywhere near it drives the latents to inf and NaN (black frames).
MAX_ADAPTER_VALUE = 65504.0


def check_adapter_tensors(path: str | Path, what: str) -> None:
    """ModelFileError naming the file and tensor when an adapter (``what``: "LoRA",
    "embedding") holds NaN, inf or values beyond MAX_ADAPTER_VALUE."""
    import torch
    from safetensors import safe_open

    read_safetensors_header(path)
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            tensor = f.get_tensor(name)
            if not tensor.is_floating_point():
                continue
            values = tensor.float()
            label = name if len(name) <= 80 else name[:77] + "..."
            bad = int((~torch.isfinite(values)).sum())
            if bad:
                raise ModelFileError(
                    f"{what} {path}: tensor {label!r} holds {bad} NaN or infinite values"
                )
            peak = float(values.abs().max()) if values.numel() else 0.0
            if peak > MAX_ADAPTER_VALUE:
                raise ModelFileError(
                    f"{what} {path}: tensor {label!r} holds a value of {peak:.3g}, beyond "
                    f"{MAX_ADAPTER_VALUE:g} (float16's range): it would make black frames"
                )


def embedding_width(path: str | Path) -> int | None:
    """The vector size of a single-vector-set embedding file, or None when it holds several
    tensors (SDXL's clip_l / clip_g) or is not safetensors."""
    if Path(path).suffix.lower() != ".safetensors":
        return None
    header = read_safetensors_header(path)
    if len(header) != 1:
        return None
    shape = next(iter(header.values()))["shape"]
    return int(shape[-1]) if shape else None


def first_line(exc: BaseException, limit: int = 200) -> str:
    """A library error cut to its first line and ``limit`` characters (never a tensor dump)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
