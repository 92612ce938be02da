"""LoRAs and textual inversion embeddings, applied to a cached base model for one job.

Both go through diffusers' own loaders (``StableDiffusionLoraLoaderMixin`` with peft,
``TextualInversionLoaderMixin``) on a pipeline that shares the base model's modules, and
both are removed when the job ends, whatever the outcome: the LoRA layers are unloaded
(never fused into the weights) and the embeddings' tokens leave the tokenizer and the text
encoder, so the next job on the cached model runs exactly as on a freshly loaded one.

A hub id (owner/name) is downloaded first, like a base model (``hub.fetch_adapter``: its
one weight file, with the job's download progress and cancel, the cache offline), and then
loaded from that file like a local one: diffusers' loaders never reach the network. A repo
holding several LoRAs is named with the one to load: owner/name/path/file.safetensors. A
local file or folder that exists always wins over a hub id.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..protocol import EmbeddingSpec, LoraSpec, hub_id_problem, shown
from .hub import ADAPTERS, DownloadHooks, HubError, adapter_candidates, fetch_adapter
from .loading import BaseModel, ModelLoadError, _check_pickle_file
from .safety import ModelFileError, check_adapter_tensors, embedding_width, first_line

log = logging.getLogger(__name__)

# Adapter names in the peft-wrapped UNet and text encoder: t2vz_lora_0, t2vz_lora_1, ...
ADAPTER_PREFIX = "t2vz_lora_"


def _source(
    path: str, kind: str, allow_pickle: bool, download: DownloadHooks | None
) -> tuple[str, dict[str, Any]]:
    """(location, loader kwargs) for a file, a folder or a hub id (``kind`` "lora" or
    "embedding"; a repo or one file of it); a hub id is downloaded here. Never a pickle
    unless allowed."""
    what = ADAPTERS[kind].label  # "LoRA", "embedding"
    local = Path(path).expanduser()
    kwargs: dict[str, Any] = {"use_safetensors": None if allow_pickle else True}
    try:
        is_dir, is_file = local.is_dir(), local.is_file()
    except OSError as exc:  # a name too long for a path (ENAMETOOLONG), a loop of links
        raise ModelLoadError(
            f"{what} {shown(path)} is not a usable path ({exc.strerror})"
        ) from None
    if is_dir:
        local = _folder_weight(local, kind, allow_pickle)
    elif not is_file:
        problem = hub_id_problem(path)
        if problem:
            raise ModelLoadError(
                f"{what} {path!r} is neither an existing file or folder nor a hub id: {problem}"
            )
        try:
            local = fetch_adapter(path, kind, allow_pickle=allow_pickle, hooks=download)
        except HubError as exc:
            raise ModelLoadError(str(exc)) from exc
    _check_pickle_file(str(local), allow_pickle)
    if local.suffix.lower() == ".safetensors":
        try:  # NaN, inf or huge weights would make black frames with exit 0
            check_adapter_tensors(local, what)
        except ModelFileError as exc:
            raise ModelLoadError(str(exc)) from None
    return str(local.parent), {**kwargs, "weight_name": local.name, "local_files_only": True}


def _folder_weight(folder: Path, kind: str, allow_pickle: bool) -> Path:
    """The one weight file of adapter folder ``folder``, chosen as for a hub repo (see
    ``hub.adapter_candidates``); ModelLoadError listing the files when there are several."""
    what = ADAPTERS[kind].label
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    found = adapter_candidates(files, kind, allow_pickle)
    if len(found) == 1:
        return folder / found[0]
    if found:
        listed = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise ModelLoadError(
            f"{what} folder {folder} holds {len(found)} weight files ({listed}): cannot tell "
            f"which to load; give the file itself, e.g. {folder / found[0]}"
        )
    pickled = adapter_candidates(files, kind, allow_pickle=True)
    hint = f" (it has pickled weights, {pickled[0]}: see --allow-pickle)" if pickled else ""
    raise ModelLoadError(f"{what} folder {folder} holds no .safetensors weights{hint}")


def _pipeline(base: BaseModel) -> Any:
    """A diffusers pipeline over the base model's modules, for its loader methods (SDXL's
    loads LoRAs into both text encoders)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if base.text_encoder_2 is not None:
        return StableDiffusionXLPipeline(**base.pipeline_components())
    return StableDiffusionPipeline(**base.pipeline_components())


def _added_tokens(tokenizer: Any, since: int) -> list[str]:
    """Tokens the tokenizer gained at ids >= ``since`` (an embedding may add several)."""
    return [t.content for i, t in tokenizer.added_tokens_decoder.items() if i >= since]


# An SDXL embedding holds one vector set per text encoder under these keys.
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")


def _load_embedding(pipe: Any, base: BaseModel, location: str, kwargs: dict, token: str) -> None:
    """Load one embedding as ``token``: into the text encoder, or for SDXL its ``clip_l``
    vectors into the first encoder and its ``clip_g`` vectors into the second."""
    if base.text_encoder_2 is None:
        pipe.load_textual_inversion(location, token=token, **kwargs)
        return
    from safetensors.torch import load_file

    path = Path(location) / kwargs["weight_name"]
    if path.suffix.lower() != ".safetensors":
        raise ValueError(
            f"an SDXL embedding must be a .safetensors file with {SDXL_EMBEDDING_KEYS}"
        )
    state = load_file(str(path))
    missing = [key for key in SDXL_EMBEDDING_KEYS if key not in state]
    if missing:
        raise ValueError(
            f"an SDXL embedding holds one vector set per text encoder ({', '.join(SDXL_EMBEDDING_KEYS)}); "
            f"this file has no {', '.join(missing)} (an SD 1.x/2.x embedding?)"
        )
    pipe.load_textual_inversion(
        state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )


@contextlib.contextmanager
def applied_adapters(
    base: BaseModel,
    loras: Sequence[LoraSpec] = (),
    embeddings: Sequence[EmbeddingSpec] = (),
    *,
    allow_pickle: bool = False,
    download: DownloadHooks | None = None,
) -> Iterator[Any]:
    """Load ``loras`` (with their weights) and ``embeddings`` into ``base`` until exit.

    Hub ids are downloaded first (progress and cancel through ``download``; a cancel raises
    ``hub.DownloadCancelled`` before anything is applied). Yields the pipeline
    (``maybe_convert_prompt`` expands multi-vector tokens) or None when there is nothing to
    apply. On exit the model is clean again, even after an error.
    """
    if not loras and not embeddings:
        yield None
        return
    # Every source first (downloads included): a missing file or a cancelled download
    # stops the job before the model is touched.
    lora_sources = [_source(lora.path, "lora", allow_pickle, download) for lora in loras]
    embedding_sources = [
        _source(embedding.path, "embedding", allow_pickle, download) for embedding in embeddings
    ]
    pipe = _pipeline(base)
    names: list[str] = []
    tokens: list[str] = []
    try:
        for i, (lora, (location, kwargs)) in enumerate(zip(loras, lora_sources, strict=True)):
            name = f"{ADAPTER_PREFIX}{i}"
            try:
                pipe.load_lora_weights(location, adapter_name=name, **kwargs)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise ModelLoadError(lora_error(lora.path, kwargs, exc)) from exc
            names.append(name)
        if names:
            pipe.set_adapters(names, adapter_weights=[lora.weight for lora in loras])
        for embedding, (location, kwargs) in zip(embeddings, embedding_sources, strict=True):
            check_embedding_width(base, embedding.path, Path(location) / kwargs["weight_name"])
            before = len(base.tokenizer)
            try:
                _load_embedding(pipe, base, location, kwargs, embedding.token)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise ModelLoadError(
                    f"could not load embedding {embedding.path} as {embedding.token!r}: "
                    f"{first_line(exc)}"
                ) from exc
            finally:
                tokens += _added_tokens(base.tokenizer, before)
        # The loaders may move new layers to their default device and dtype.
        base.unet.to(base.device, base.dtype)
        base.text_encoder.to(base.device, base.dtype)
        if base.text_encoder_2 is not None:
            base.text_encoder_2.to(base.device, base.dtype)
        log.info("applied %d LoRA(s) and %d embedding(s)", len(names), len(embeddings))
        yield pipe
    finally:
        _remove(pipe, base, names, tokens)


def lora_error(path: str, kwargs: dict[str, Any], exc: BaseException) -> str:
    """One or two lines for a LoRA that failed to load: the file and, for a LoRA of another
    architecture, how many of its tensors do not fit (not peft's line per tensor)."""
    where = Path(path) / kwargs["weight_name"] if Path(path).is_dir() else path
    mismatches = str(exc).count("size mismatch")
    if mismatches:
        return (
            f"LoRA {where} does not fit this base model: {mismatches} of its "
            "tensors have other shapes (a LoRA made for another architecture, e.g. SDXL "
            "for SD 1.5?)"
        )
    return f"could not load LoRA {where}: {first_line(exc)}"


def check_embedding_width(base: BaseModel, name: str, path: Path) -> None:
    """ModelLoadError with both sizes when an embedding's vectors do not match the text
    encoder's token embeddings (diffusers' own message shows a placeholder instead)."""
    try:
        width = embedding_width(path)
    except ModelFileError as exc:
        raise ModelLoadError(str(exc)) from None
    expected = int(base.text_encoder.get_input_embeddings().weight.shape[-1])
    if width is not None and width != expected:
        raise ModelLoadError(
            f"embedding {path} has vectors of size {width}; this model's text encoder takes "
            f"{expected} (an embedding made for another model family)"
        )


def _remove(pipe: Any, base: BaseModel, names: list[str], tokens: list[str]) -> None:
    """Unload the job's LoRA layers and embedding tokens (called however the job ended)."""
    if names:
        pipe.unload_lora_weights()
    if tokens:
        pipe.unload_textual_inversion(tokens=tokens)
        # unload_textual_inversion may rebuild the tokenizer: keep the base model's in step.
        base.tokenizer = pipe.tokenizer
        base.text_encoder = pipe.text_encoder
        if base.text_encoder_2 is not None:  # SDXL: the same tokens in the second encoder
            pipe.unload_textual_inversion(
                tokens=tokens, tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2
            )
            base.tokenizer_2 = pipe.tokenizer_2
            base.text_encoder_2 = pipe.text_encoder_2
    base.unet.requires_grad_(False)
    base.text_encoder.requires_grad_(False)
    if base.text_encoder_2 is not None:
        base.text_encoder_2.requires_grad_(False)


def convert_prompt(pipe: Any, base: BaseModel, prompt: str) -> str:
    """``prompt`` with multi-vector embedding tokens expanded ("<t>" -> "<t> <t>_1 ...")."""
    if pipe is None or not prompt:
        return prompt
    return pipe.maybe_convert_prompt(prompt, base.tokenizer)
