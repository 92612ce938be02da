"""Cross-frame attention (Sect. 3.3.2) as diffusers attention processors.

Every self-attention layer of the UNet (and of each ControlNet) lets each frame's queries
attend to the keys and values of frame 1, the anchor, of the same guidance branch. The
anchor's keys/values are computed once per denoising step, when the chunk holding frame 1
runs, and reused by every later chunk of that step: no recompute of frame 1 per chunk
and no copy of it per frame. Text cross-attention is unchanged, except that it can record
the prompt's attention maps for background-smoothing masks (Sect. 3.3.3).

Processors are installed for one run by ``installed_processors`` and restored afterwards,
also when the run fails.

The processors implement the attention layers of Stable Diffusion 1.x-shaped UNets and
ControlNets (diffusers' ``BasicTransformerBlock``: (batch, tokens, channels) inputs, no
normalisation inside the layer, no residual), as diffusers' ``AttnProcessor2_0`` computes
them. The installation refuses a layer that uses one of the other features of diffusers'
``Attention`` (``UnsupportedAttentionError``) rather than computing it untested.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


class UnsupportedAttentionError(ValueError):
    """An attention layer or call uses a feature the processors here do not implement."""


class AnchorState:
    """What the processors of one run share: batch layout and the anchor's keys/values."""

    def __init__(self) -> None:
        # Guidance branches stacked in the batch: 1 (no CFG), 2 (CFG), 3 (Pix2Pix).
        self.branches = 1
        # True while the running batch starts each branch with frame 1: store its K/V.
        self.capture = True
        # Layer name -> the anchor's (keys, values), None between steps. Every layer's name
        # is registered when its processor is made and never removed, so the dict's keys
        # stay the same from call to call: a compiled UNet (torch.compile guards on them)
        # then does not recompile when the anchor is stored or dropped.
        self.keys_values: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def register(self, name: str) -> None:
        """Reserve the anchor slot of the layer ``name``."""
        self.keys_values.setdefault(name, None)

    def held(self) -> list[str]:
        """The layers whose anchor keys/values are stored now."""
        return [name for name, kv in self.keys_values.items() if kv is not None]

    def clear(self) -> None:
        """Drop the stored anchor keys/values (end of a step or of a run)."""
        for name in self.keys_values:
            self.keys_values[name] = None


class CrossFrameAttnProcessor:
    """Self-attention where every frame attends to the anchor frame of its branch."""

    def __init__(self, state: AnchorState, name: str):
        self.state = state
        self.name = name
        state.register(name)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if hidden_states.ndim != 3:
            raise UnsupportedAttentionError(
                f"{self.name}: cross-frame attention takes (batch, tokens, channels) hidden "
                f"states, got shape {tuple(hidden_states.shape)}"
            )
        if encoder_hidden_states is not None:
            raise UnsupportedAttentionError(
                f"{self.name}: cross-frame attention is self-attention, got encoder_hidden_states"
            )
        if attention_mask is not None:
            raise UnsupportedAttentionError(f"{self.name}: cross-frame attention takes no mask")
        batch, tokens, _ = hidden_states.shape
        branches = self.state.branches
        frames = batch // branches
        query = attn.to_q(hidden_states)
        if self.state.capture:
            anchor = hidden_states.view(branches, frames, tokens, -1)[:, 0]  # (branches, tokens, c)
            key, value = attn.to_k(anchor), attn.to_v(anchor)  # (branches, tokens, inner)
            self.state.keys_values[self.name] = (key, value)
        else:
            key, value = self.state.keys_values[self.name]

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        # All frames of a branch share one set of anchor keys, so their queries are laid end
        # to end: one attention call per branch, no expanded copies of the anchor.
        query = query.view(branches, frames * tokens, heads, head_dim).transpose(1, 2)
        # (branches, heads, frames * tokens, head_dim)
        key = key.view(branches, -1, heads, head_dim).transpose(1, 2)
        value = value.view(branches, -1, heads, head_dim).transpose(1, 2)
        # (branches, heads, anchor tokens, head_dim)
        # SDPA's defaults are AttnProcessor2_0's arguments: no dropout, not causal.
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
        # (branches * frames, tokens, inner)
        return _project_out(attn, out)


def _project_out(attn, out: torch.Tensor) -> torch.Tensor:
    """The attention layer's output projection and dropout (``to_out``), as diffusers does."""
    return attn.to_out[1](attn.to_out[0](out))


class CrossAttnMapRecorder:
    """Shared store of the prompt's cross-attention maps, accumulated per frame."""

    def __init__(self, latent_size: tuple[int, int], token_mask: torch.Tensor, branch: int):
        self.latent_size = latent_size
        # (text tokens,) bool: the prompt's own tokens (no start/end/padding).
        self.token_mask = token_mask
        # Which guidance branch holds the prompt (the conditional one).
        self.branch = branch
        self.active = False
        self.frame_ids: Sequence[int] = ()
        self.maps: dict[int, torch.Tensor] = {}

    def add(self, probs: torch.Tensor, branches: int) -> None:
        """Accumulate (batch, heads, tokens, text) attention probabilities for the chunk."""
        batch, _, tokens, _ = probs.shape
        frames = batch // branches
        lh, lw = self.latent_size
        h = max(1, round(math.sqrt(tokens * lh / lw)))
        w = tokens // h
        mask = self.token_mask.to(probs.device)
        per_frame = probs.view(branches, frames, -1, tokens, probs.shape[-1])[self.branch]
        # (frames, heads, tokens, text) -> mean over heads and prompt tokens -> (frames, tokens)
        saliency = per_frame.float().mean(1)[..., mask].mean(-1)
        saliency = saliency.view(frames, 1, h, w)
        saliency = F.interpolate(saliency, size=(lh, lw), mode="bilinear", align_corners=False)
        for frame, smap in zip(self.frame_ids, saliency[:, 0], strict=True):
            self.maps[frame] = self.maps.get(frame, 0) + smap.cpu()


class RecordingCrossAttnProcessor:
    """Text cross-attention that also records attention maps while its recorder is active."""

    def __init__(self, recorder: CrossAttnMapRecorder, state: AnchorState, latent_tokens: int):
        self.recorder = recorder
        self.state = state
        self.latent_tokens = latent_tokens
        self.plain = AttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        # Maps from layers at 1/2 of the latent resolution and below carry the layout.
        record = self.recorder.active and tokens * 4 <= self.latent_tokens
        if encoder_hidden_states is None or not record:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask)
        if attention_mask is not None:
            raise UnsupportedAttentionError("recording cross-attention maps takes no mask")
        heads = attn.heads
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = query.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)  # (b, heads, tokens, d)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)  # (b, heads, text, d)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        probs = (query @ key.transpose(-1, -2) * attn.scale).softmax(-1)  # (b, heads, tokens, text)
        self.recorder.add(probs, self.state.branches)
        out = (probs @ value).transpose(1, 2).reshape(batch, tokens, heads * head_dim)
        return _project_out(attn, out)


def unsupported_features(attn: Attention, self_attention: bool) -> list[str]:
    """The features of diffusers' ``Attention`` layer ``attn`` the processors do not implement.

    Stable Diffusion 1.x (and 2.x) transformer blocks use none of them; diffusers' generic
    processor also serves other layouts (VAE-style blocks, qk-normalised transformers).
    """
    found = []
    if attn.spatial_norm is not None:
        found.append("spatial_norm")
    if attn.group_norm is not None:
        found.append("group_norm")
    if attn.norm_q is not None or attn.norm_k is not None:
        found.append("norm_q/norm_k (qk_norm)")
    if attn.norm_cross is not None:
        found.append("norm_cross (cross_attention_norm)")
    if attn.added_kv_proj_dim is not None:
        found.append("added_kv_proj_dim")
    if attn.residual_connection:
        found.append("residual_connection")
    if attn.rescale_output_factor != 1.0:
        found.append(f"rescale_output_factor={attn.rescale_output_factor}")
    if self_attention and attn.is_cross_attention:
        found.append("keys/values from the text (only_cross_attention)")
    return found


def _check_layer(tag: str, name: str, attn: Attention, self_attention: bool) -> None:
    """Refuse a layer the processors would compute wrongly (see ``unsupported_features``)."""
    found = unsupported_features(attn, self_attention)
    if found:
        layer = name.removesuffix(".processor")
        kind = "cross-frame attention" if self_attention else "attention-map recording"
        raise UnsupportedAttentionError(
            f"{tag} attention layer {layer} uses {', '.join(found)}, which {kind} does not "
            "support (Stable Diffusion 1.x-shaped UNets and ControlNets use none of them)"
        )


def _is_self_attention(name: str) -> bool:
    """diffusers names self-attention ``attn1`` in its transformer blocks."""
    return name.endswith("attn1.processor")


# Attention layers per model, found once: walking a UNet's modules on every run costs
# milliseconds, a visible share of a short job on a small model.
_ATTENTION_LAYERS: WeakKeyDictionary[torch.nn.Module, list[tuple[str, torch.nn.Module]]] = (
    WeakKeyDictionary()
)


def attention_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(processor name as in ``model.attn_processors``, attention module) for every layer."""
    layers = _ATTENTION_LAYERS.get(model)
    if layers is None:
        layers = [
            (f"{name}.processor", module)
            for name, module in model.named_modules()
            if name and hasattr(module, "set_processor") and hasattr(module, "get_processor")
        ]
        _ATTENTION_LAYERS[model] = layers
    return layers


@contextmanager
def installed_processors(
    models: Sequence[tuple[str, torch.nn.Module]],
    state: AnchorState,
    recorder: CrossAttnMapRecorder | None = None,
    latent_tokens: int = 0,
    cross_frame: bool = True,
) -> Iterator[None]:
    """Install cross-frame attention in ``models`` for the block; restore the originals after.

    With ``cross_frame=False`` self-attention keeps the model's own per-frame processors (the
    ablation "without cross-frame attention"); the cross-attention recorder still installs.
    Raises ``UnsupportedAttentionError`` for a layer that uses what the processors do not
    implement (the models are left as they were).
    """
    saved: list[tuple[torch.nn.Module, object]] = []
    try:
        for tag, model in models:
            for name, layer in attention_layers(model):
                original = layer.get_processor()
                saved.append((layer, original))
                if _is_self_attention(name):
                    if cross_frame:
                        _check_layer(tag, name, layer, self_attention=True)
                        layer.set_processor(CrossFrameAttnProcessor(state, f"{tag}/{name}"))
                elif recorder is not None and tag == "unet":
                    _check_layer(tag, name, layer, self_attention=False)
                    layer.set_processor(RecordingCrossAttnProcessor(recorder, state, latent_tokens))
        yield
    finally:
        for layer, original in reversed(saved):
            layer.set_processor(original)
        state.clear()
