"""Latent-space pieces of Text2Video-Zero: per-frame noise, motion warps, DDPM jumps (Sect. 3.3).

Short pure functions on tensors; the engine composes them into the denoising loop.
"""

from __future__ import annotations

import hashlib

import torch

# Official unit of motion strength: 1/512 of the frame per frame.
MOTION_UNIT = 512.0


def noise_seed(seed: int, frame: int, purpose: str) -> int:
    """A 63-bit seed derived from (job seed, frame index, purpose), independent of chunking."""
    digest = hashlib.sha256(f"t2vz:{seed}:{frame}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def frame_noise(seed: int, frame: int, purpose: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise for one frame, drawn on the CPU in fp32 so every device agrees."""
    generator = torch.Generator(device="cpu").manual_seed(noise_seed(seed, frame, purpose))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def latent_shift(motion: tuple[float, float], latent_width: int, latent_height: int) -> tuple:
    """Per-frame translation in latent pixels for ``motion`` in 1/512 of the frame per frame."""
    dx, dy = motion
    return (dx * latent_width / MOTION_UNIT, dy * latent_height / MOTION_UNIT)


def sample_offset(size: int) -> float:
    """Where the official warp samples, relative to x + s, along a latent side of ``size``.

    The official code (and diffusers) builds the flow on a 512x512 pixel grid and resizes
    it bilinearly to the latent, so latent pixel x reads x + s - size / 1024. Sampling at
    exactly x + s puts the default 1.5 px/frame shift of a 64-wide latent on ties.
    """
    return -size / (2.0 * MOTION_UNIT)


def _nearest_indices(size: int, shifts: torch.Tensor) -> torch.Tensor:
    """(frames, size) source indices of a shifted axis: nearest sample, reflection padding.

    Positions reflect about -0.5 and size - 0.5 (grid_sample, align_corners=False) and
    round half up, so a shift on an exact tie is a clean translation, never a duplication.
    """
    positions = torch.arange(size, dtype=torch.float64)[None] + shifts.double()[:, None]
    positions = positions + sample_offset(size)  # (frames, size)
    period = 2.0 * size
    folded = torch.remainder(positions + 0.5, period)
    folded = torch.where(folded > size, period - folded, folded) - 0.5
    return torch.floor(folded + 0.5).clamp(0, size - 1).long()


def translate_latents(latents: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Warp each latent by its own (sx, sy) translation: out(x, y) = in(x + sx, y + sy).

    Nearest sampling with reflection padding at the official sample positions (see
    ``sample_offset``); ``latents`` is (frames, channels, h, w) and ``shifts`` is
    (frames, 2) in latent pixels.
    """
    frames, channels, h, w = latents.shape
    shifts = shifts.detach().to("cpu")
    rows = _nearest_indices(h, shifts[:, 1]).to(latents.device)  # (frames, h)
    cols = _nearest_indices(w, shifts[:, 0]).to(latents.device)  # (frames, w)
    rows = rows[:, None, :, None].expand(frames, channels, h, w)  # (frames, channels, h, w)
    cols = cols[:, None, None, :].expand(frames, channels, h, w)
    return latents.gather(2, rows).gather(3, cols)


def motion_shifts(frame_ids: list[int], shift: tuple[float, float]) -> torch.Tensor:
    """(frames, 2) translations delta^k = (k - 1) * shift for 0-based frame indices k - 1."""
    steps = torch.tensor(frame_ids, dtype=torch.float32)[:, None]  # (frames, 1)
    return steps * torch.tensor(shift, dtype=torch.float32)[None]  # (frames, 2)


def ddpm_jump(
    x_t0: torch.Tensor, alpha_t0: float, alpha_t1: float, noise: torch.Tensor
) -> torch.Tensor:
    """DDPM forward from timestep t0 to the noisier t1: sqrt(a1/a0) x + sqrt(1 - a1/a0) eps.

    ``alpha_*`` are the scheduler's alphas_cumprod at the two timesteps (a1 < a0).
    """
    ratio = alpha_t1 / alpha_t0
    return ratio**0.5 * x_t0 + (1.0 - ratio) ** 0.5 * noise.to(x_t0)


def smooth_background(
    latents: torch.Tensor, anchor_warped: torch.Tensor, masks: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Sect. 3.3.3: x <- M x + (1 - M) (alpha W(x^1) + (1 - alpha) x), M = 1 on the foreground."""
    masks = masks.to(latents)
    blended = alpha * anchor_warped + (1.0 - alpha) * latents
    return masks * latents + (1.0 - masks) * blended


def background_mask(fg: torch.Tensor, anchor_fg_warped: torch.Tensor) -> torch.Tensor:
    """(1 - M^k)(1 - W_k(M^1)): frame k's background with frame 1's foreground kept out."""
    return (1.0 - fg) * (1.0 - anchor_fg_warped.to(fg))
