"""Flow-guided consistency: tie each frame to the previous one along the input's motion.

Beyond the paper. Text2Video-Zero's cross-frame attention ties every frame's appearance to
frame 1 but leaves frame-to-frame flicker. Rerender-A-Video (Yang et al., "Rerender A Video:
Zero-Shot Text-Guided Video-to-Video Translation", SIGGRAPH Asia 2023, Sect. 4.1, the
shape-aware cross-frame latent fusion) fuses, during part of the schedule, each frame's
predicted clean latent x0 with another frame's x0 warped by the optical flow, where the
flow says the content is visible in both:

    x0^k <- (1 - s M^k) x0^k + s M^k W_k(x0^(k-1)),

with W_k the backward warp along the flow from frame k to frame k - 1, M^k the visibility
mask (forward-backward consistency: Sundaram et al., ECCV 2010) and s the strength. Here
the previous frame's x0 is the already fused one of the same denoising step, so the tie
runs along the whole video, and the DDIM step is redone with the fused x0 and the model's
own noise estimate.

Conventions: a flow is (n, 2, h, w) in pixels of its grid, channel 0 to the right (x) and
channel 1 down (y); the backward flow of frame k maps each pixel p of frame k to
p + flow[p] in frame k - 1. Pure torch: tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Forward-backward consistency (Sundaram et al. 2010): a pixel is visible in both frames when
# |b + f(p + b)|^2 <= OCC_RELATIVE (|b|^2 + |f(p + b)|^2) + OCC_ABSOLUTE (pixels^2).
OCC_RELATIVE = 0.01
OCC_ABSOLUTE = 0.5


@dataclass(frozen=True)
class FlowFusion:
    """When and how strongly predicted clean latents are fused along the flow."""

    # Part of the joint denoising steps where fusion acts, (start, end]. Early steps decide
    # layout, late ones texture; Rerender's default period is (0.5, 0.8) of the steps. On the
    # shapes ControlNet (bench/quality.py, flow, seeds 0-1, estimated flow; warp Delta E of
    # the paper 5.95, silhouette IoU 0.623, colour drift 2.23): (0.5, 0.8) at strength 1
    # gave 9.58 (true motion); (0.8, 1) at 1 gave 4.88 (true motion), IoU 0.53, drift 17.6:
    # a chain of full copies blurs the shape away; (0.8, 1) at 0.5 gave 3.11, IoU 0.658,
    # drift 3.18; (0.6, 1) at 0.5 gave 2.51, IoU 0.648, drift 1.47: the default.
    start: float = 0.6
    end: float = 1.0
    # s above: 1 replaces the visible pixels by the warped previous frame; 0.5 lets frame
    # k - j weigh 0.5^j in frame k, so the chain's blur (a bilinear warp a frame) fades.
    # The defaults of strength, pixel_aware(_relative) and pixel_strength: latent 0.25 +
    # pixel-aware (relative) 0.25 + pixel 0.6, chosen on held-out seeds (QUALITY.md, flow).
    strength: float = 0.25
    # The final pixel-space fusion of the decoded frames (FrameFusion below): each decoded
    # frame pulled this far toward the previous fused frame, warped along the flow at full
    # resolution, where visible; 0: off. Chosen on held-out seeds (QUALITY.md, flow).
    pixel_strength: float = 0.6
    # Pixel-aware latent fusion (Rerender-A-Video Sect. 4.1) inside the loop, after the
    # latent one: at fusion steps the previous frame's fused x0 is decoded, warped along the
    # full-resolution flow, re-encoded (posterior mean) and frame k's x0 pulled this far
    # toward it where at least ``pixel_aware_visible`` of a latent cell's pixels are visible;
    # 0: off. Costs one VAE decode and one encode per frame per fusion step, and needs the
    # flow mapping's ``pixels(k)`` (media/flow.py).
    pixel_aware: float = 0.25
    pixel_aware_visible: float = 0.5
    # Pull toward x0 + (E(W(D(prev))) - E(D(x0))): the warp's change alone, without the VAE
    # round trip's loss (one more decode and encode: two of each a frame and fusion step).
    pixel_aware_relative: bool = True

    def active(self, step: int, first: int, total: int) -> bool:
        """Whether joint step ``step`` (``first`` .. ``total`` - 1) fuses: the part of the
        schedule it ends, (step - first + 1) / joint steps, lies in (start, end]; so the
        last step fuses with any end of 1, however few the steps."""
        joint = max(total - first, 1)
        position = (step - first + 1) / joint  # in (0, 1]
        return self.start < position <= self.end


def check_flow(flow: torch.Tensor, name: str = "flow") -> None:
    """Raise ValueError unless ``flow`` is a finite (n, 2, h, w) float tensor."""
    if flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"{name} must be (frames, 2, height, width), got {tuple(flow.shape)}")
    if not flow.is_floating_point() or not torch.isfinite(flow).all():
        raise ValueError(f"{name} must hold finite floats")


def sample_grid(flow: torch.Tensor) -> torch.Tensor:
    """(n, h, w, 2) grid_sample coordinates of p + flow[p] (align_corners=False)."""
    n, _, h, w = flow.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=flow.dtype, device=flow.device),
        torch.arange(w, dtype=flow.dtype, device=flow.device),
        indexing="ij",
    )  # (h, w) each: pixel centres at integer coordinates
    x = xs + flow[:, 0]  # (n, h, w)
    y = ys + flow[:, 1]
    # Pixel centre i sits at (2 i + 1) / size - 1 in grid_sample's [-1, 1] (align_corners=False).
    return torch.stack([(2 * x + 1) / w - 1, (2 * y + 1) / h - 1], dim=-1)  # (n, h, w, 2)


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp: out[p] = image[p + flow[p]], bilinear, edges repeated outside."""
    check_flow(flow)
    grid = sample_grid(flow.to(image.dtype))
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


def inside(flow: torch.Tensor) -> torch.Tensor:
    """(n, 1, h, w) 1 where p + flow[p] lands inside the frame (within half a pixel)."""
    n, _, h, w = flow.shape
    grid = sample_grid(flow)  # (n, h, w, 2) in [-1, 1] for the frame
    ok = (grid.abs() <= 1).all(dim=-1)  # (n, h, w)
    return ok[:, None].to(flow.dtype)


def visibility(backward: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """(n, 1, h, w) 1 where pixel p of frame k is visible in frame k - 1, else 0.

    ``backward`` is frame k's flow to k - 1, ``forward`` frame k - 1's flow to k; a pixel is
    visible when following one and then the other comes back (Sundaram et al. 2010), and
    its match lies inside the frame.
    """
    check_flow(backward, "backward")
    check_flow(forward, "forward")
    if backward.shape != forward.shape:
        raise ValueError(
            f"backward and forward flows differ in shape: {tuple(backward.shape)} and "
            f"{tuple(forward.shape)}"
        )
    there = warp(forward, backward)  # (n, 2, h, w): forward flow at p + b(p)
    loop = (backward + there).pow(2).sum(1, keepdim=True)  # (n, 1, h, w)
    bound = OCC_RELATIVE * (
        backward.pow(2).sum(1, keepdim=True) + there.pow(2).sum(1, keepdim=True)
    )
    consistent = (loop <= bound + OCC_ABSOLUTE).to(backward.dtype)
    return consistent * inside(backward)


def resize_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A flow on another grid (h, w): area-averaged and rescaled to that grid's pixels."""
    check_flow(flow)
    h, w = flow.shape[-2:]
    out = F.interpolate(flow, size=size, mode="area" if size[0] <= h else "bilinear")
    scale = torch.tensor([size[1] / w, size[0] / h], dtype=flow.dtype, device=flow.device)
    return out * scale.view(1, 2, 1, 1)  # (n, 2, size[0], size[1])


def resize_mask(mask: torch.Tensor, size: tuple[int, int], threshold: float = 0.99) -> torch.Tensor:
    """A (n, 1, h, w) 0/1 mask on another grid: a cell is 1 only if (nearly) all of it was."""
    small = F.interpolate(mask, size=size, mode="area")  # (n, 1, size[0], size[1])
    return (small >= threshold).to(mask.dtype)


def fuse(
    x0: torch.Tensor,
    previous: torch.Tensor,
    flow: torch.Tensor,
    visible: torch.Tensor,
    strength: float = 1.0,
) -> torch.Tensor:
    """Rerender-A-Video's fusion: x0 pulled toward the warped previous x0 where visible.

    ``x0`` and ``previous`` are (n, c, h, w), ``flow`` (n, 2, h, w) frame k -> k - 1 and
    ``visible`` (n, 1, h, w) in [0, 1].
    """
    weight = strength * visible.to(x0.dtype)
    return x0 + weight * (warp(previous, flow) - x0)


def fuse_sequence(
    x0: torch.Tensor,
    previous: torch.Tensor | None,
    flows: torch.Tensor,
    strength: float = 1.0,
) -> torch.Tensor:
    """Fuse consecutive frames in order: each with the already fused one before it.

    ``x0`` (n, c, h, w) are consecutive frames; ``previous`` (1, c, h, w) the fused x0 of
    the frame before the first, or None when the first is frame 1 (kept as is); ``flows``
    the backward flow (channels 0-1) and visibility (channel 2) of each frame that has a
    previous one: (n, 3, h, w), or (n - 1, 3, h, w) when ``previous`` is None.
    """
    skip = 1 if previous is None else 0
    if len(flows) != len(x0) - skip:
        raise ValueError(f"{len(x0)} frames need {len(x0) - skip} flows, got {len(flows)}")
    out = x0.clone()
    for i in range(skip, len(x0)):
        flow, visible = flows[i - skip : i - skip + 1, :2], flows[i - skip : i - skip + 1, 2:]
        out[i : i + 1] = fuse(
            x0[i : i + 1], out[i - 1 : i] if i else previous, flow, visible, strength
        )
    return out


class FrameFusion:
    """The final pixel-space fusion of decoded frames, in frame order.

    Rerender-A-Video (Sect. 4.1, pixel-aware fusion) fuses in pixel space, where the flow is
    exact to the pixel, not to the 8-pixel latent cell: each decoded frame k >= 1 becomes
    ``fuse(frame k, fused frame k - 1, flow, visible, strength)``. ``pixel_flow(k)`` gives
    frame k's (3, H, W) backward flow (pixels, channels 0-1) and visibility (channel 2).
    Frames come a few at a time (decoding is sliced); the last fused frame is carried, so
    the result does not depend on the slices. Frame 1 (index 0) passes unchanged.
    """

    def __init__(self, pixel_flow: Callable[[int], torch.Tensor], strength: float):
        self.pixel_flow = pixel_flow
        self.strength = strength
        self.previous: torch.Tensor | None = None  # (1, 3, H, W) float, last fused frame
        self.next_frame = 0

    def __call__(self, frame_ids: Sequence[int], images: torch.Tensor) -> torch.Tensor:
        """Fused (n, H, W, 3) uint8 frames of the next consecutive ``frame_ids``."""
        frame_ids = list(frame_ids)
        expected = list(range(self.next_frame, self.next_frame + len(frame_ids)))
        if frame_ids != expected:
            raise ValueError(f"frames must come in order from {self.next_frame}, got {frame_ids}")
        x = images.permute(0, 3, 1, 2).float()  # (n, 3, H, W) in [0, 255]
        flows = [self.pixel_flow(f) for f in frame_ids if f != 0]
        flows = torch.stack(flows) if flows else x.new_zeros(0, 3, *x.shape[2:])
        fused = fuse_sequence(x, self.previous, flows.to(x.dtype), self.strength)
        self.previous, self.next_frame = fused[-1:], expected[-1] + 1
        return fused.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
