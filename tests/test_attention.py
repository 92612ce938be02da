"""backend/attention.py: cross-frame attention to frame 1, map recording, processor restore."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from backend.attention import (
    AnchorState,
    CrossAttnMapRecorder,
    CrossFrameAttnProcessor,
    RecordingCrossAttnProcessor,
    installed_processors,
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
    assert set(state.keys_values) == {"layer"}
    second, _ = cross_frame(attn, x[2:], capture=False, state=state)
    torch.testing.assert_close(torch.cat([first, second]), full, atol=ATOL, rtol=ATOL)
    state.clear()
    assert not state.keys_values


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
    assert not state.keys_values


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
