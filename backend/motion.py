"""Latent-space pieces of Text2Video-Zero: per-frame noise, motion warps, DDPM jumps (Sect. 3.3).

Short pure functions on tensors; the engine composes them into the denoising loop.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

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


def translate_latents(latents: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Warp each latent by its own (sx, sy) translation: out(x, y) = in(x + sx, y + sy).

    Nearest sampling with reflection padding, as in the official code; ``latents`` is
    (frames, channels, h, w) and ``shifts`` is (frames, 2) in latent pixels.
    """
    frames, _, h, w = latents.shape
    ys = torch.arange(h, device=latents.device, dtype=torch.float32)
    xs = torch.arange(w, device=latents.device, dtype=torch.float32)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
    shifts = shifts.to(device=latents.device, dtype=torch.float32)
    sample_x = grid_x[None] + shifts[:, 0, None, None]  # (frames, h, w)
    sample_y = grid_y[None] + shifts[:, 1, None, None]
    # Pixel centres in grid_sample's normalised coordinates (align_corners=False).
    grid = torch.stack(((sample_x + 0.5) / w * 2 - 1, (sample_y + 0.5) / h * 2 - 1), dim=-1)
    # (frames, h, w, 2)
    warped = F.grid_sample(
        latents.float(), grid, mode="nearest", padding_mode="reflection", align_corners=False
    )
    return warped.to(latents.dtype)


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
