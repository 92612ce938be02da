"""backend/engine/attention.py: cross-frame attention to frame 1, map recording, processor restore."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from backend.engine.attention import (
    AnchorState,
    CrossAttnMapRecorder,
    CrossFrameAttnProcessor,
    RecordingCrossAttnProcessor,
    UnsupportedAttentionError,
    installed_processors,
    unsupported_features,
)

ATOL = 1e-5


@pytest.fixture
def attn() -> Any:
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=16, heads=2, dim_head=8).eval()


def plain_attention(attn: Any, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """diffusers' own attention of ``queries`` over the tokens of ``keys``."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn.set_processor(AttnProcessor2_0())
    return attn(queries, encoder_hidden_states=keys)


def cross_frame(attn: Any, x: torch.Tensor, branches: int = 1, capture: bool = True, state=None):
    state = state or AnchorState()
    state.branches, state.capture = branches, capture
    attn.set_processor(CrossFrameAttnProcessor(state, "layer"))
    return attn(x), state


@torch.no_grad()
def test_every_frame_attends_to_frame_one(attn: Any) -> None:
    x = torch.randn(4, 6, 16)  # (frames, tokens, channels)
    out, _ = cross_frame(attn, x)
    for k in range(4):
        expected = plain_attention(attn, x[k : k + 1], x[0:1])
        torch.testing.assert_close(out[k : k + 1], expected, atol=ATOL, rtol=ATOL)


@torch.no_grad()
def test_frames_depend_only_on_themselves_and_frame_one(attn: Any) -> None:
    x = torch.randn(4, 6, 16)
    out, _ = cross_frame(attn, x)
    changed3 = x.clone()
    changed3[2] += torch.randn(6, 16)
    out3, _ = cross_frame(attn, changed3)
    torch.testing.assert_close(out3[[0, 1, 3]], out[[0, 1, 3]], atol=ATOL, rtol=ATOL)
    assert not torch.allclose(out3[2], out[2], atol=1e-3)

    changed1 = x.clone()
    changed1[0] += torch.randn(6, 16)
    out1, _ = cross_frame(attn, changed1)
    for k in range(4):
        assert not torch.allclose(out1[k], out[k], atol=1e-3)


@torch.no_grad()
def test_each_guidance_branch_has_its_own_anchor(attn: Any) -> None:
    x = torch.randn(6, 6, 16)  # 2 branches x 3 frames: [u0, u1, u2, c0, c1, c2]
    out, _ = cross_frame(attn, x, branches=2)
    torch.testing.assert_close(out[4:5], plain_attention(attn, x[4:5], x[3:4]), atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1:2], plain_attention(attn, x[1:2], x[0:1]), atol=ATOL, rtol=0)


@torch.no_grad()
def test_later_chunks_reuse_the_captured_anchor(attn: Any) -> None:
    x = torch.randn(4, 6, 16)
    full, _ = cross_frame(attn, x)
    first, state = cross_frame(attn, x[:2])
    assert state.held() == ["layer"]
    second, _ = cross_frame(attn, x[2:], capture=False, state=state)
    torch.testing.assert_close(torch.cat([first, second]), full, atol=ATOL, rtol=ATOL)
    state.clear()
    assert state.held() == [] and list(state.keys_values) == ["layer"]  # the slot stays


# --------------------------------------------------------------------------- in the UNet


def unet_out(unet: Any, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    t = torch.tensor(500)
    return unet(latents, t, encoder_hidden_states=text, return_dict=False)[0]


@torch.no_grad()
def test_installed_in_the_unet_frames_follow_frame_one(tiny_base: Any) -> None:
    unet = tiny_base.unet
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    text = torch.randn(1, 77, 32, generator=gen).expand(3, -1, -1)
    x3 = x.clone()
    x3[2] = torch.randn(4, 8, 8, generator=gen)
    x1 = x.clone()
    x1[0] = torch.randn(4, 8, 8, generator=gen)

    plain = unet_out(unet, x, text), unet_out(unet, x1, text)
    with installed_processors([("unet", unet)], AnchorState()):
        out, out3, out1 = (unet_out(unet, v, text) for v in (x, x3, x1))
    # Changing frame 3 leaves frames 1 and 2 alone; changing frame 1 changes every frame.
    torch.testing.assert_close(out3[:2], out[:2], atol=ATOL, rtol=ATOL)
    assert not torch.allclose(out3[2], out[2], atol=1e-3)
    assert all(not torch.allclose(out1[k], out[k], atol=1e-3) for k in range(3))
    # Without the processors frames are independent: the effect above is cross-frame attention.
    torch.testing.assert_close(plain[1][1:], plain[0][1:], atol=ATOL, rtol=ATOL)
    # ... and installing them changes what frames 2..m compute, but not frame 1 itself.
    torch.testing.assert_close(out[0], plain[0][0], atol=ATOL, rtol=ATOL)
    assert not torch.allclose(out[1], plain[0][1], atol=1e-3)


def test_only_self_attention_is_replaced_and_everything_is_restored(
    tiny_base: Any, tiny_controlnet: Any
) -> None:
    unet = tiny_base.unet
    before = {"unet": dict(unet.attn_processors), "cn": dict(tiny_controlnet.attn_processors)}
    assert any(n.endswith("attn1.processor") for n in before["unet"])
    state = AnchorState()
    with installed_processors([("unet", unet), ("controlnet0", tiny_controlnet)], state):
        for tag, model in (("unet", unet), ("cn", tiny_controlnet)):
            for name, proc in model.attn_processors.items():
                if name.endswith("attn1.processor"):
                    assert isinstance(proc, CrossFrameAttnProcessor)
                else:
                    assert proc is before[tag][name]  # text cross-attention untouched
        names = {p.name for p in tiny_controlnet.attn_processors.values() if hasattr(p, "name")}
        assert names and all(n.startswith("controlnet0/") for n in names)
        state.keys_values["x"] = (torch.zeros(1), torch.zeros(1))
    assert dict(unet.attn_processors) == before["unet"]
    assert all(unet.attn_processors[n] is p for n, p in before["unet"].items())
    assert all(tiny_controlnet.attn_processors[n] is p for n, p in before["cn"].items())
    assert state.held() == []  # the anchor keys/values are dropped with the processors


def test_processors_are_restored_when_the_block_fails(tiny_base: Any) -> None:
    unet = tiny_base.unet
    before = dict(unet.attn_processors)
    with (
        pytest.raises(RuntimeError, match="boom"),
        installed_processors([("unet", unet)], AnchorState()),
    ):
        raise RuntimeError("boom")
    assert all(unet.attn_processors[n] is p for n, p in before.items())


@torch.no_grad()
def test_recording_cross_attention_changes_nothing_and_records_per_frame(tiny_base: Any) -> None:
    unet = tiny_base.unet
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    text = torch.randn(1, 77, 32, generator=gen).expand(3, -1, -1)
    token_mask = torch.zeros(77, dtype=torch.bool)
    token_mask[1:4] = True
    recorder = CrossAttnMapRecorder((8, 8), token_mask, branch=0)
    state = AnchorState()
    with installed_processors([("unet", unet)], state, recorder, latent_tokens=64):
        assert any(
            isinstance(p, RecordingCrossAttnProcessor) for p in unet.attn_processors.values()
        )
        reference = unet_out(unet, x, text)
        recorder.active, recorder.frame_ids = True, [0, 4, 7]
        recorded = unet_out(unet, x, text)
    torch.testing.assert_close(recorded, reference, atol=ATOL, rtol=ATOL)
    assert sorted(recorder.maps) == [0, 4, 7]
    for m in recorder.maps.values():
        assert m.shape == (8, 8)
        assert (m >= 0).all() and m.sum() > 0
    assert not torch.allclose(recorder.maps[0], recorder.maps[7])


# --------------------------------------------------------------------------- what is refused

# SD 1.5's UNet (runwayml/stable-diffusion-v1-5, unet/config.json) and, with the text size and
# head widths of SD 2.1, upcast attention and linear projections, SD 2.1's.
SD15_UNET = dict(
    in_channels=4,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD21_UNET = dict(
    SD15_UNET,
    cross_attention_dim=1024,
    attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True,
    upcast_attention=True,
)


SD_UNETS = {"sd15": SD15_UNET, "sd21": SD21_UNET, "sd15-pix2pix": dict(SD15_UNET, in_channels=8)}


def sd_layout(kind: str) -> torch.nn.Module:
    """A full-size SD model built on the meta device (no weights, no memory)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from backend.models.loading import SD15_CONTROLNET_CONFIG

    with torch.device("meta"):
        if kind == "sd15-controlnet":
            return ControlNetModel.from_config(ControlNetModel.load_config(SD15_CONTROLNET_CONFIG))
        return UNet2DConditionModel(**SD_UNETS[kind])


@pytest.mark.parametrize("kind", [*SD_UNETS, "sd15-controlnet"])
def test_stable_diffusion_layouts_use_no_refused_feature(kind: str) -> None:
    model = sd_layout(kind)
    layers = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "Attention"]
    assert len(layers) == (14 if kind == "sd15-controlnet" else 32)
    for name, layer in layers:
        assert unsupported_features(layer, self_attention=name.endswith("attn1")) == [], name
    with installed_processors([("unet", model)], AnchorState(), recorder_for(8), 64):
        assert isinstance(
            model.mid_block.attentions[0].transformer_blocks[0].attn2.processor,
            RecordingCrossAttnProcessor,
        )


def recorder_for(size: int) -> CrossAttnMapRecorder:
    return CrossAttnMapRecorder((size, size), torch.ones(77, dtype=torch.bool), branch=0)


class Block(torch.nn.Module):
    """A transformer block's two attention layers, named as diffusers names them."""

    def __init__(self, attn1: dict, attn2: dict) -> None:
        from diffusers.models.attention_processor import Attention

        super().__init__()
        self.attn1 = Attention(query_dim=32, heads=2, dim_head=8, **attn1)
        self.attn2 = Attention(query_dim=32, heads=2, dim_head=8, cross_attention_dim=12, **attn2)

    def processors(self) -> list[Any]:
        return [self.attn1.processor, self.attn2.processor]


# diffusers Attention arguments -> how the refusal names the feature they switch on.
REFUSED = {
    "spatial_norm": (dict(spatial_norm_dim=4), "spatial_norm"),
    "group_norm": (dict(norm_num_groups=4), "group_norm"),
    "qk_norm": (dict(qk_norm="layer_norm"), "norm_q/norm_k (qk_norm)"),
    "norm_cross": (dict(cross_attention_norm="layer_norm"), "norm_cross (cross_attention_norm)"),
    "added_kv": (dict(added_kv_proj_dim=12), "added_kv_proj_dim"),
    "residual": (dict(residual_connection=True), "residual_connection"),
    "rescale": (dict(rescale_output_factor=2.0), "rescale_output_factor=2.0"),
}


@pytest.mark.parametrize("feature", sorted(REFUSED))
def test_a_self_attention_layer_using_a_refused_feature_is_named_and_nothing_installs(
    feature: str,
) -> None:
    kwargs, named = REFUSED[feature]
    block = Block(attn1=kwargs, attn2={})
    before = block.processors()
    message = (
        f"controlnet0 attention layer attn1 uses {named}, which cross-frame attention does not "
        "support (Stable Diffusion 1.x-shaped UNets and ControlNets use none of them)"
    )
    with (
        pytest.raises(UnsupportedAttentionError, match=f"^{re.escape(message)}$"),
        installed_processors([("controlnet0", block)], AnchorState()),
    ):
        pass
    assert all(now is old for now, old in zip(block.processors(), before, strict=True))
    # Without cross-frame attention the layer keeps diffusers' processor: nothing to refuse.
    with installed_processors([("controlnet0", block)], AnchorState(), cross_frame=False):
        assert all(now is old for now, old in zip(block.processors(), before, strict=True))


@pytest.mark.parametrize("feature", sorted(REFUSED))
def test_a_cross_attention_layer_using_a_refused_feature_is_refused_only_for_recording(
    feature: str,
) -> None:
    kwargs, named = REFUSED[feature]
    block = Block(attn1={}, attn2=kwargs)
    message = (
        f"unet attention layer attn2 uses {named}, which attention-map recording does not "
        "support (Stable Diffusion 1.x-shaped UNets and ControlNets use none of them)"
    )
    with (
        pytest.raises(UnsupportedAttentionError, match=f"^{re.escape(message)}$"),
        installed_processors([("unet", block)], AnchorState(), recorder_for(4), 16),
    ):
        pass
    with installed_processors([("unet", block)], AnchorState()):  # no recorder: attn2 untouched
        assert isinstance(block.attn1.processor, CrossFrameAttnProcessor)


def test_every_refused_feature_of_a_layer_is_named() -> None:
    block = Block(
        attn1=dict(norm_num_groups=4, residual_connection=True, cross_attention_dim=12), attn2={}
    )
    assert unsupported_features(block.attn1, self_attention=True) == [
        "group_norm",
        "residual_connection",
        "keys/values from the text (only_cross_attention)",
    ]
    # A cross-attention layer takes its keys and values from the text by definition.
    assert unsupported_features(block.attn2, self_attention=False) == []
    with (
        pytest.raises(
            UnsupportedAttentionError,
            match="^unet attention layer attn1 uses group_norm, residual_connection, keys/values "
            r"from the text \(only_cross_attention\), which cross-frame",
        ),
        installed_processors([("unet", block)], AnchorState()),
    ):
        pass


def test_self_attention_with_keys_from_the_text_is_refused() -> None:
    # UNet2DConditionModel(only_cross_attention=True) builds attn1 like this.
    block = Block(attn1=dict(cross_attention_dim=12), attn2={})
    with (
        pytest.raises(UnsupportedAttentionError, match=r"attn1 uses keys/values from the text"),
        installed_processors([("unet", block)], AnchorState()),
    ):
        pass


@torch.no_grad()
def test_calls_outside_sd_self_attention_are_refused(attn: Any) -> None:
    x = torch.randn(2, 6, 16)
    with pytest.raises(UnsupportedAttentionError, match=r"^layer: .*got shape \(2, 16, 2, 3\)$"):
        cross_frame(attn, x.transpose(1, 2).reshape(2, 16, 2, 3))  # (batch, channels, h, w)
    processor = CrossFrameAttnProcessor(AnchorState(), "layer")
    with pytest.raises(UnsupportedAttentionError, match=r"^layer: .*got encoder_hidden_states$"):
        processor(attn, x, encoder_hidden_states=x)
    with pytest.raises(
        UnsupportedAttentionError, match=r"^layer: cross-frame attention takes no mask$"
    ):
        processor(attn, x, attention_mask=torch.zeros(2, 1, 6))
    assert processor(attn, x).shape == x.shape


@torch.no_grad()
def test_recording_refuses_a_text_mask_only_while_it_records() -> None:
    block = Block(attn1={}, attn2={})
    recorder = recorder_for(4)
    x, text = torch.randn(2, 4, 32), torch.randn(2, 77, 12)
    mask = torch.zeros(2, 1, 77)
    mask[..., 5:] = -10000.0  # diffusers' additive mask: only the first 5 text tokens count
    processor = RecordingCrossAttnProcessor(recorder, AnchorState(), latent_tokens=16)
    # Not recording: diffusers' processor computes the layer, mask and all.
    out = processor(block.attn2, x, text, mask)
    torch.testing.assert_close(out, AttnProcessor2_0()(block.attn2, x, text, mask))
    torch.testing.assert_close(out, AttnProcessor2_0()(block.attn2, x, text[:, :5]))
    assert not torch.allclose(out, AttnProcessor2_0()(block.attn2, x, text), atol=1e-3)
    recorder.active = True
    with pytest.raises(
        UnsupportedAttentionError, match="^recording cross-attention maps takes no mask$"
    ):
        processor(block.attn2, x, text, mask)


@torch.no_grad()
def test_maps_are_recorded_only_at_half_the_latent_resolution_and_below() -> None:
    """latent_tokens 64 (8x8): layers of 16 tokens (4x4) record, layers of 64 tokens do not."""
    block = Block(attn1={}, attn2={})
    recorder = recorder_for(8)
    recorder.active, recorder.frame_ids = True, [0, 1]
    processor = RecordingCrossAttnProcessor(recorder, AnchorState(), latent_tokens=64)
    text = torch.randn(2, 77, 12)
    full = torch.randn(2, 64, 32)
    torch.testing.assert_close(
        processor(block.attn2, full, text), AttnProcessor2_0()(block.attn2, full, text)
    )
    assert recorder.maps == {}
    half = torch.randn(2, 16, 32)
    torch.testing.assert_close(
        processor(block.attn2, half, text), AttnProcessor2_0()(block.attn2, half, text)
    )
    assert sorted(recorder.maps) == [0, 1]


def test_recorded_maps_follow_the_layer_layout_and_accumulate() -> None:
    """A 1-row layer (tokens 1 x 8) of a 2 x 16 latent, 2 branches of 2 frames.

    Per frame: the conditional branch's attention to the prompt's tokens, averaged over heads
    and prompt tokens, one value per layer token; upsampled bilinearly (half-pixel centres)
    to the latent and summed over calls. A left half at 1 and a right half at 0 give, per
    latent row, seven 1s, 0.75, 0.25 and seven 0s (source x = (x + 0.5) / 2 - 0.5).
    """
    token_mask = torch.zeros(6, dtype=torch.bool)
    token_mask[1:3] = True  # the prompt's own tokens
    recorder = CrossAttnMapRecorder((2, 16), token_mask, branch=1)
    recorder.frame_ids = [3, 5]
    probs = torch.zeros(4, 2, 8, 6)  # (branches * frames, heads, tokens, text)
    probs[2, :, :4, 1:3] = 1.0  # conditional branch, frame 3: left half attends to the prompt
    probs[3, 0, 4:, 1] = 0.8  # frame 5: right half, one head and one prompt token
    probs[:2] = 0.5  # the unconditional branch, never read
    recorder.add(probs, branches=2)
    row = torch.tensor([1.0] * 7 + [0.75, 0.25] + [0.0] * 7)
    torch.testing.assert_close(recorder.maps[3], row.expand(2, 16))
    torch.testing.assert_close(recorder.maps[5], 0.2 * row.flip(0).expand(2, 16))
    recorder.add(probs, branches=2)  # a second layer or step adds to the same maps
    torch.testing.assert_close(recorder.maps[3], 2 * row.expand(2, 16))
