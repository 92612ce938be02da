"""backend/engine/motion.py: per-frame noise, latent warps, the DDPM jump and background smoothing."""

from __future__ import annotations

import math

import pytest
import torch

from backend.engine.motion import (
    MOTION_UNIT,
    background_mask,
    ddpm_jump,
    frame_noise,
    latent_shift,
    motion_shifts,
    noise_seed,
    smooth_background,
    translate_latents,
)


def ramp(frames: int = 1, h: int = 8, w: int = 8) -> torch.Tensor:
    """(frames, 4, h, w) latents whose every value is distinct (x, y and channel encoded)."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    base = torch.stack([100 * c + 10 * y + x for c in range(4)]).float()  # (4, h, w)
    return base[None].repeat(frames, 1, 1, 1)


# --------------------------------------------------------------------------- noise


def test_frame_noise_depends_only_on_seed_frame_and_purpose() -> None:
    shape = (4, 8, 8)
    a = frame_noise(7, 3, "x_T", shape)
    assert a.dtype == torch.float32 and a.shape == shape
    assert torch.equal(a, frame_noise(7, 3, "x_T", shape))
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(a, frame_noise(7, 3, "x_T", shape))
    for other in (frame_noise(8, 3, "x_T", shape), frame_noise(7, 4, "x_T", shape)):
        assert not torch.allclose(a, other)
    assert not torch.allclose(a, frame_noise(7, 3, "t0_to_t1", shape))


def test_noise_seeds_are_63_bit_and_distinct() -> None:
    seeds = {noise_seed(s, f, p) for s in range(3) for f in range(50) for p in ("a", "b")}
    assert len(seeds) == 300
    assert all(0 <= s < 2**63 for s in seeds)


def test_noise_seeds_stay_those_of_earlier_versions() -> None:
    """A stored job regenerates the same frames only while these values hold.

    The first 8 bytes of SHA-256("t2vz:SEED:FRAME:PURPOSE") as a little-endian integer with
    its top bit cleared (values written down from the version that made the first results).
    """
    assert noise_seed(0, 0, "x_T") == 2901168464950973386
    assert noise_seed(1234, 7, "t0_to_t1") == 565230636197511558
    assert noise_seed(42, 1, "x_T") == 4970520861566336293  # odd: the lowest bit is kept
    generator = torch.Generator().manual_seed(4970520861566336293)
    assert torch.equal(frame_noise(42, 1, "x_T", (4, 8)), torch.randn(4, 8, generator=generator))


def test_frame_noise_is_float32_whatever_torch_defaults_to() -> None:
    expected = frame_noise(7, 3, "x_T", (4, 8, 8))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        noise = frame_noise(7, 3, "x_T", (4, 8, 8))
    finally:
        torch.set_default_dtype(default)
    assert noise.dtype == torch.float32
    assert torch.equal(noise, expected)


# --------------------------------------------------------------------------- warps


def test_latent_shift_is_in_512ths_of_the_frame() -> None:
    # width 64 -> latent 8 wide: 64/512 of the frame per frame is one latent pixel.
    assert latent_shift((64.0, 0.0), 8, 8) == (1.0, 0.0)
    assert latent_shift((12.0, 12.0), 64, 32) == (12 * 64 / MOTION_UNIT, 12 * 32 / MOTION_UNIT)
    assert latent_shift((-128.0, 256.0), 16, 8) == (-4.0, 4.0)


def test_motion_shifts_grow_with_the_frame_index() -> None:
    shifts = motion_shifts([0, 1, 3, 6], (1.0, -0.5))
    assert shifts.shape == (4, 2)
    assert shifts.tolist() == [[0.0, 0.0], [1.0, -0.5], [3.0, -1.5], [6.0, -3.0]]


def test_translate_by_zero_is_identity() -> None:
    x = torch.randn(3, 4, 8, 8)
    assert torch.equal(translate_latents(x, torch.zeros(3, 2)), x)


@pytest.mark.parametrize(("sx", "sy"), [(1, 0), (0, 2), (3, 1), (-2, 0), (-1, -3)])
def test_translate_moves_content_by_whole_pixels(sx: int, sy: int) -> None:
    """out(x, y) = in(x + sx, y + sy) wherever that lies inside the latent."""
    x = ramp()
    out = translate_latents(x, torch.tensor([[float(sx), float(sy)]]))
    h, w = 8, 8
    for yy in range(h):
        for xx in range(w):
            if 0 <= xx + sx < w and 0 <= yy + sy < h:
                assert torch.equal(out[0, :, yy, xx], x[0, :, yy + sy, xx + sx])
    # Reflection padding: nothing outside is zero-filled, every value comes from the input.
    assert set(out.unique().tolist()) <= set(x.unique().tolist())


def _reflect(i: int, n: int) -> int:
    """Index i folded back into 0..n-1 by reflection about -0.5 and n - 0.5 (one fold)."""
    return -1 - i if i < 0 else 2 * n - 1 - i if i >= n else i


@pytest.mark.parametrize(("h", "w"), [(6, 10), (10, 6)])
@pytest.mark.parametrize(("sx", "sy"), [(1, 0), (0, 2), (3, -1)])
def test_translate_non_square_moves_x_by_sx_and_y_by_sy(h: int, w: int, sx: int, sy: int) -> None:
    """On h != w latents every output pixel, border included, is read by hand: a swapped
    axis (shift or size) reads other pixels or fails to gather. Whole-pixel shifts: the
    sample offset (-size/1024) never changes the rounding here."""
    x = ramp(h=h, w=w)  # values 100 c + 10 y + x, distinct for h, w <= 10
    out = translate_latents(x, torch.tensor([[float(sx), float(sy)]]))
    assert out.shape == x.shape
    for yy in range(h):
        for xx in range(w):
            source = x[0, :, _reflect(yy + sy, h), _reflect(xx + sx, w)]
            assert torch.equal(out[0, :, yy, xx], source), (yy, xx)


def test_each_frame_gets_its_own_shift() -> None:
    """Frame k warped by k pixels (64/512 motion at latent width 8) for 4 frames at once."""
    frames = 4
    x = ramp(frames)
    shift = latent_shift((64.0, 0.0), 8, 8)
    out = translate_latents(x, motion_shifts(list(range(frames)), shift))
    for k in range(frames):
        assert torch.equal(out[k, :, :, : 8 - k], x[k, :, :, k:])
    assert torch.equal(out[0], x[0])


# Real job sizes (pixels) and their latents; every frame of a 16-frame job.
REAL_SIZES = [(512, 512), (768, 768), (896, 512), (1024, 576)]
JOB_FRAMES = 16


def _official_warp() -> object:
    """diffusers' copy of the official warp (deprecated module); skip if this diffusers lacks it."""
    module = pytest.importorskip(
        "diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_zero"
    )
    warp = getattr(module, "create_motion_field_and_warp_latents", None)
    if warp is None:
        pytest.skip("this diffusers has no create_motion_field_and_warp_latents (0.42.1 has)")
    return warp


def wide_ramp(frames: int, h: int, w: int) -> torch.Tensor:
    """(frames, 4, h, w) float64 latents whose every value names its (channel, y, x)."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    base = torch.stack([1_000_000 * c + 1000 * y + x for c in range(4)]).double()
    return base[None].repeat(frames, 1, 1, 1)


@pytest.mark.parametrize(("width", "height"), REAL_SIZES)
@pytest.mark.parametrize("motion", [(12.0, 12.0), (6.2, -4.6), (-18.6, 9.4)])
def test_warp_samples_where_the_official_code_does(
    width: int, height: int, motion: tuple[float, float]
) -> None:
    """Every frame of a 16-frame job, fractional shifts: equal to diffusers' official warp.

    These strengths put no sample of these sizes on an exact tie, where the official code
    itself duplicates pixels (e.g. 7.3 at 512x512, frame 6) and ours rounds half up.
    """
    official = _official_warp()
    h, w = height // 8, width // 8
    x = wide_ramp(JOB_FRAMES, h, w)
    frames = list(range(JOB_FRAMES))
    ours = translate_latents(x, motion_shifts(frames, latent_shift(motion, w, h)))
    theirs = official(motion[0], motion[1], frames, x)
    for k in frames:
        assert torch.equal(ours[k], theirs[k]), f"frame {k} differs at {width}x{height}"


@pytest.mark.parametrize(("width", "height"), REAL_SIZES)
@pytest.mark.parametrize("motion", [(12.0, 12.0), (16.0, 8.0), (7.3, -5.1)])
def test_warp_never_duplicates_rows_or_columns(
    width: int, height: int, motion: tuple[float, float]
) -> None:
    """Inside the frame each warp is a whole-pixel translation: neighbours stay neighbours.

    Sampling at exactly x + s put the default shift (1.5 px at 512x512) on ties that nearest
    rounding sends half to even: columns 2, 2, 4, 4, ... on every other frame.
    """
    h, w = height // 8, width // 8
    x = wide_ramp(JOB_FRAMES, h, w)
    frames = list(range(JOB_FRAMES))
    out = translate_latents(x, motion_shifts(frames, latent_shift(motion, w, h)))
    cols = out[:, 0, 0, :] % 1000  # (frames, w): source column of every output column
    rows = (out[:, 0, :, 0] // 1000) % 1000  # (frames, h): source row of every output row
    for k in frames:
        for sources in (cols[k], rows[k]):
            steps = sources[1:] - sources[:-1]
            # Forward steps are +1; the reflected border only turns back (steps <= 0).
            forward = steps[steps > 0]
            assert torch.equal(forward, torch.ones_like(forward)), f"frame {k}: {sources}"


def test_a_shift_on_an_exact_tie_is_still_a_clean_translation() -> None:
    """Even where x + s - w/1024 lands on .5, rounding is one-sided: no doubled pixels."""
    w = 8  # offset -1/128: a shift of 0.5 + 1/128 puts every sample on a tie
    x = wide_ramp(1, 1, w)
    out = translate_latents(x, torch.tensor([[0.5 + 1 / 128, 0.0]], dtype=torch.float64))
    cols = (out[0, 0, 0] % 1000).tolist()
    assert cols[:-1] == list(range(1, w))


def test_translate_keeps_dtype() -> None:
    x = ramp().half()
    assert translate_latents(x, torch.tensor([[1.0, 0.0]])).dtype == torch.float16


# --------------------------------------------------------------------------- DDPM jump


def test_ddpm_jump_formula() -> None:
    x, eps = torch.randn(4, 8, 8), torch.randn(4, 8, 8)
    a0, a1 = 0.7, 0.2
    expected = math.sqrt(a1 / a0) * x + math.sqrt(1 - a1 / a0) * eps
    torch.testing.assert_close(ddpm_jump(x, a0, a1, eps), expected)


def test_ddpm_jump_lands_on_the_forward_marginal_of_t1() -> None:
    """From x_t0 = sqrt(a0) x0 + sqrt(1-a0) e the jump gives mean sqrt(a1) x0, variance 1-a1."""
    gen = torch.Generator().manual_seed(0)
    n, x0, a0, a1 = 400_000, 1.5, 0.8, 0.3
    x_t0 = math.sqrt(a0) * x0 + math.sqrt(1 - a0) * torch.randn(n, generator=gen)
    x_t1 = ddpm_jump(x_t0, a0, a1, torch.randn(n, generator=gen))
    assert abs(x_t1.mean().item() - math.sqrt(a1) * x0) < 0.01
    assert abs(x_t1.var().item() - (1 - a1)) < 0.01


def test_ddpm_jump_keeps_the_latents_dtype() -> None:
    """bf16 latents (a bf16 model) with the fp32 per-frame noise: the jump stays in bf16."""
    x, eps = torch.randn(2, 4, 8, 8).bfloat16(), torch.randn(2, 4, 8, 8)
    out = ddpm_jump(x, 0.7, 0.2, eps)
    assert out.dtype == torch.bfloat16
    expected = math.sqrt(0.2 / 0.7) * x + math.sqrt(1 - 0.2 / 0.7) * eps.bfloat16()
    torch.testing.assert_close(out, expected)


def test_ddpm_jump_between_equal_timesteps_is_identity() -> None:
    x = torch.randn(4, 8, 8)
    torch.testing.assert_close(ddpm_jump(x, 0.5, 0.5, torch.randn(4, 8, 8)), x)


# --------------------------------------------------------------------------- smoothing


def test_smooth_background_blends_only_the_background() -> None:
    x, anchor = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    fg = torch.zeros(2, 1, 8, 8)
    fg[:, :, :, :4] = 1  # left half foreground
    out = smooth_background(x, anchor, fg, alpha=0.6)
    assert torch.equal(out[..., :4], x[..., :4])
    torch.testing.assert_close(out[..., 4:], 0.6 * anchor[..., 4:] + 0.4 * x[..., 4:])
    assert torch.equal(smooth_background(x, anchor, torch.ones(2, 1, 8, 8), 0.6), x)
    torch.testing.assert_close(smooth_background(x, anchor, torch.zeros(2, 1, 8, 8), 1.0), anchor)


def test_smooth_background_non_square_uses_the_mask_as_laid_out() -> None:
    """A 6x10 latent with the top two rows foreground: those rows kept, the rest blended.

    A transposed mask would not broadcast against 6x10 latents; one laid out by columns
    would keep other pixels.
    """
    x, anchor = torch.randn(2, 4, 6, 10), torch.randn(2, 4, 6, 10)
    fg = torch.zeros(2, 1, 6, 10)
    fg[:, :, :2, :] = 1  # top two rows foreground
    fg[1, :, 5, 9] = 1  # and frame 2's bottom-right corner
    out = smooth_background(x, anchor, fg, alpha=0.25)
    for k in range(2):
        for yy in range(6):
            for xx in range(10):
                own, warped = x[k, :, yy, xx], anchor[k, :, yy, xx]
                kept = yy < 2 or (k, yy, xx) == (1, 5, 9)
                expected = own if kept else 0.25 * warped + 0.75 * own
                torch.testing.assert_close(out[k, :, yy, xx], expected)


def test_smooth_background_keeps_the_latents_dtype() -> None:
    """fp32 masks (from attention maps) on bf16 latents: the blend stays in bf16."""
    x, anchor = torch.randn(2, 4, 8, 8).bfloat16(), torch.randn(2, 4, 8, 8).bfloat16()
    fg = torch.full((2, 1, 8, 8), 0.5)
    out = smooth_background(x, anchor, fg, alpha=0.5)
    assert out.dtype == torch.bfloat16
    expected = 0.75 * x.float() + 0.25 * anchor.float()
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)  # bf16 rounding


def test_background_mask_by_hand() -> None:
    """(1 - M^k)(1 - W_k(M^1)) on soft masks: 0.75 * 0.5, 0.5 * 1, 0 * 0.25, 1 * 0."""
    fg = torch.tensor([0.25, 0.5, 1.0, 0.0]).view(1, 1, 2, 2)
    anchor_fg_warped = torch.tensor([0.5, 0.0, 0.75, 1.0], dtype=torch.float64).view(1, 1, 2, 2)
    out = background_mask(fg, anchor_fg_warped)
    assert out.dtype == torch.float32  # fg's: the warped anchor mask follows it
    torch.testing.assert_close(out, torch.tensor([0.375, 0.5, 0.0, 0.0]).view(1, 1, 2, 2))
