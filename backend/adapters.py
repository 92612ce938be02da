"""LoRAs and textual inversion embeddings, applied to a cached base model for one job.

Both go through diffusers' own loaders (``StableDiffusionLoraLoaderMixin`` with peft,
``TextualInversionLoaderMixin``) on a pipeline that shares the base model's modules, and
both are removed when the job ends, whatever the outcome: the LoRA layers are unloaded
(never fused into the weights) and the embeddings' tokens leave the tokenizer and the text
encoder, so the next job on the cached model runs exactly as on a freshly loaded one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .models import BaseModel, ModelLoadError, _check_pickle_file, _looks_like_path
from .protocol import EmbeddingSpec, LoraSpec

log = logging.getLogger(__name__)

# Adapter names in the peft-wrapped UNet and text encoder: t2vz_lora_0, t2vz_lora_1, ...
ADAPTER_PREFIX = "t2vz_lora_"


def _source(path: str, what: str, allow_pickle: bool) -> tuple[str, dict[str, Any]]:
    """(location, loader kwargs) for a file, a folder or a hub id; never a pickle unless allowed."""
    local = Path(path).expanduser()
    kwargs: dict[str, Any] = {"use_safetensors": None if allow_pickle else True}
    if local.is_file():
        _check_pickle_file(str(local), allow_pickle)
        return str(local.parent), {**kwargs, "weight_name": local.name, "local_files_only": True}
    if local.is_dir():
        return str(local), {**kwargs, "local_files_only": True}
    if _looks_like_path(path) or path.count("/") != 1:
        raise ModelLoadError(
            f"{what} {path!r} is neither an existing file or folder nor a hub id (owner/name)"
        )
    return path, kwargs


def _pipeline(base: BaseModel) -> Any:
    """A diffusers pipeline over the base model's modules, for its loader methods."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**base.pipeline_components())


def _added_tokens(tokenizer: Any, since: int) -> list[str]:
    """Tokens the tokenizer gained at ids >= ``since`` (an embedding may add several)."""
    return [t.content for i, t in tokenizer.added_tokens_decoder.items() if i >= since]


@contextlib.contextmanager
def applied_adapters(
    base: BaseModel,
    loras: Sequence[LoraSpec] = (),
    embeddings: Sequence[EmbeddingSpec] = (),
    *,
    allow_pickle: bool = False,
) -> Iterator[Any]:
    """Load ``loras`` (with their weights) and ``embeddings`` into ``base`` until exit.

    Yields the pipeline (``maybe_convert_prompt`` expands multi-vector tokens) or None when
    there is nothing to apply. On exit the model is clean again, even after an error.
    """
    if not loras and not embeddings:
        yield None
        return
    pipe = _pipeline(base)
    names: list[str] = []
    tokens: list[str] = []
    try:
        for i, lora in enumerate(loras):
            location, kwargs = _source(lora.path, "LoRA", allow_pickle)
            name = f"{ADAPTER_PREFIX}{i}"
            try:
                pipe.load_lora_weights(location, adapter_name=name, **kwargs)
            except (OSError, ValueError, KeyError) as exc:
                raise ModelLoadError(f"could not load LoRA {lora.path!r}: {exc}") from exc
            names.append(name)
        if names:
            pipe.set_adapters(names, adapter_weights=[lora.weight for lora in loras])
        for embedding in embeddings:
            location, kwargs = _source(embedding.path, "embedding", allow_pickle)
            before = len(base.tokenizer)
            try:
                pipe.load_textual_inversion(location, token=embedding.token, **kwargs)
            except (OSError, ValueError, KeyError) as exc:
                raise ModelLoadError(
                    f"could not load embedding {embedding.path!r} as {embedding.token!r}: {exc}"
                ) from exc
            finally:
                tokens += _added_tokens(base.tokenizer, before)
        # The loaders may move new layers to their default device and dtype.
        base.unet.to(base.device, base.dtype)
        base.text_encoder.to(base.device, base.dtype)
        log.info("applied %d LoRA(s) and %d embedding(s)", len(names), len(embeddings))
        yield pipe
    finally:
        _remove(pipe, base, names, tokens)


def _remove(pipe: Any, base: BaseModel, names: list[str], tokens: list[str]) -> None:
    """Unload the job's LoRA layers and embedding tokens (called however the job ended)."""
    if names:
        pipe.unload_lora_weights()
    if tokens:
        pipe.unload_textual_inversion(tokens=tokens)
        # unload_textual_inversion may rebuild the tokenizer: keep the base model's in step.
        base.tokenizer = pipe.tokenizer
        base.text_encoder = pipe.text_encoder
    base.unet.requires_grad_(False)
    base.text_encoder.requires_grad_(False)


def convert_prompt(pipe: Any, base: BaseModel, prompt: str) -> str:
    """``prompt`` with multi-vector embedding tokens expanded ("<t>" -> "<t> <t>_1 ...")."""
    if pipe is None or not prompt:
        return prompt
    return pipe.maybe_convert_prompt(prompt, base.tokenizer)
