"""Deterministic image analysis of the shapes world (``backend.models.shapes``) for the quality benchmark.

Decoded frames of the ``builtin:shapes`` models are read the way a person would: which colour
is the background, which pixels are the shape, what colour and kind of shape it is, and how
frames of a video relate once the camera motion is taken out. Everything is plain numpy
(OpenCV for connected components and erosion), no model, so the figures mean the same on any
machine. The tests check these functions on the world's own renders, where the answers are
known (tests/test_shape_metrics.py).

* Colour: every pixel is matched in CIELAB (Delta E 1976) to the palette in its two tones,
  the full colour (shapes, light texture) and ``SHADE`` times it (dark texture).
* Background: the colour most pixels on the frame's border have.
* Foreground: pixels whose nearest palette colour is not the background's.
* Shape kind: the template (circle, square, triangle as ``backend.models.shapes`` draws them) that
  overlaps the largest foreground blob best (IoU), fitted over position and size.
* Video: each frame is compared with frame 1 translated by the motion (content displacement in
  pixels), on the part of the frame that frame 1 covers after the translation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from backend.models.shapes import COLOURS, PALETTE, SHADE, SHAPES, Scene

# Pixels farther than this (Delta E) from every palette tone belong to no colour.
MAX_COLOUR_DISTANCE = 40.0
# Width in pixels of the border ring whose majority colour is the background.
BORDER = 2
# A frame position is compared only if at least this fraction of the frame is covered by
# frame 1 after the translation (the rest came from padding).
MIN_VALID_FRACTION = 0.25


# ---------------------------------------------------------------------------- colour


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB colours: (..., 3) uint8 or floats in [0, 255] -> (..., 3) float."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])  # normalised to the white point
    eps = (6 / 29) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lightness = 116 * f[..., 1] - 16
    return np.stack([lightness, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def delta_e(lab_a: np.ndarray, lab_b: np.ndarray) -> np.ndarray:
    """CIE 1976 colour difference (Euclidean distance in CIELAB) along the last axis."""
    return np.linalg.norm(np.asarray(lab_a) - np.asarray(lab_b), axis=-1)


def _palette_tones() -> tuple[np.ndarray, np.ndarray]:
    """Lab of every palette colour in both tones (14, 3), and each tone's colour index (14,)."""
    rgb, owner = [], []
    for i, name in enumerate(COLOURS):
        full = np.asarray(PALETTE[name], dtype=np.float64)
        rgb += [full, SHADE * full]
        owner += [i, i]
    return srgb_to_lab(np.stack(rgb)), np.asarray(owner)


TONES_LAB, TONE_OWNER = _palette_tones()
NO_COLOUR = -1


def label_colours(image: np.ndarray) -> np.ndarray:
    """(H, W) index into COLOURS of each pixel's nearest palette tone; NO_COLOUR if none is near."""
    lab = srgb_to_lab(image).reshape(-1, 3)  # (pixels, 3)
    # Squared distances to every tone as |a|^2 - 2 a.b + |b|^2: one matrix product.
    squared = (lab**2).sum(1)[:, None] - 2 * lab @ TONES_LAB.T + (TONES_LAB**2).sum(1)[None]
    nearest = squared.argmin(1)  # (pixels,)
    labels = TONE_OWNER[nearest]
    labels[squared[np.arange(len(lab)), nearest] > MAX_COLOUR_DISTANCE**2] = NO_COLOUR
    return labels.reshape(image.shape[:2])


def background_colour(labels: np.ndarray) -> int:
    """The colour index most pixels of the border ring have (NO_COLOUR if none has any)."""
    ring = np.ones(labels.shape, dtype=bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    counts = np.bincount(labels[ring][labels[ring] >= 0], minlength=len(COLOURS))
    return int(counts.argmax()) if counts.any() else NO_COLOUR


def foreground_mask(labels: np.ndarray, background: int) -> np.ndarray:
    """(H, W) bool: pixels of a palette colour other than the background's."""
    return (labels != background) & (labels != NO_COLOUR)


def dominant_colour(labels: np.ndarray, mask: np.ndarray) -> int:
    """The colour index most pixels under ``mask`` have (NO_COLOUR for an empty mask)."""
    values = labels[mask & (labels >= 0)]
    if values.size == 0:
        return NO_COLOUR
    return int(np.bincount(values, minlength=len(COLOURS)).argmax())


def erode(mask: np.ndarray, pixels: int = 1) -> np.ndarray:
    """The mask shrunk by ``pixels`` (3x3 erosion): drops the blended edge of a shape."""
    if pixels <= 0:
        return mask.copy()
    kernel = np.ones((3, 3), np.uint8)
    return cv2.erode(mask.astype(np.uint8), kernel, iterations=pixels).astype(bool)


def mean_lab(image: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """Mean CIELAB colour of the pixels under ``mask``, or None when it is empty."""
    if not mask.any():
        return None
    return srgb_to_lab(image[mask]).mean(0)


# ---------------------------------------------------------------------------- shapes


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a bool mask (empty if the mask is)."""
    count, components = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(components.ravel())[1:]
    return components == (1 + int(sizes.argmax()))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (NaN when both are empty)."""
    union = np.logical_or(a, b).sum()
    if union == 0:
        return math.nan
    return float(np.logical_and(a, b).sum() / union)


def _templates(kind: str, cx: np.ndarray, cy: np.ndarray, half: np.ndarray, h: int, w: int):
    """(candidates, H, W) bool masks of ``kind`` at pixel centres, as backend.models.shapes draws it."""
    ys, xs = (np.mgrid[0:h, 0:w] + 0.5).astype(np.float32)  # pixel centres
    dx = xs[None] - cx.astype(np.float32)[:, None, None]  # (candidates, H, W)
    dy = ys[None] - cy.astype(np.float32)[:, None, None]
    r = half.astype(np.float32)[:, None, None]
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)  # apex up, base down


def fit_shape(mask: np.ndarray) -> tuple[str | None, float]:
    """The shape kind whose best-placed template overlaps ``mask`` most, and that IoU.

    Each kind starts from the blob's area and centroid (for a triangle the centroid sits a
    third of the half-height below the box centre) and is refined over a grid of positions
    (+-5 px) and sizes (x0.76 to x1.31), coarse then fine, so shapes the frame cuts off
    still fit.
    """
    area = float(mask.sum())
    if area < 4:
        return None, 0.0
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    mx, my = xs.mean() + 0.5, ys.mean() + 0.5
    start = {
        "circle": (mx, my, math.sqrt(area / math.pi)),
        "square": (mx, my, math.sqrt(area) / 2),
        "triangle": (mx, my - math.sqrt(area / 2) / 3, math.sqrt(area / 2)),
    }
    best_kind, best_iou = None, -1.0
    for kind in SHAPES:
        x0, y0, r0 = start[kind]
        score = 0.0
        # Coarse grid, then a fine one around the coarse winner.
        for offsets, scales in (
            (np.arange(-4.0, 5.0, 2.0), np.geomspace(0.8, 1.25, 5)),
            (np.arange(-1.0, 2.0, 1.0), np.geomspace(0.95, 1.05, 3)),
        ):
            gx, gy, gs = (a.ravel() for a in np.meshgrid(offsets, offsets, scales, indexing="ij"))
            cx, cy, r = x0 + gx, y0 + gy, r0 * gs
            cand = _templates(kind, cx, cy, r, h, w)  # (candidates, H, W)
            inter = (cand & mask[None]).sum((1, 2))
            union = (cand | mask[None]).sum((1, 2))
            scores = inter / np.maximum(union, 1)
            best = int(scores.argmax())
            score = max(score, float(scores[best]))
            x0, y0, r0 = cx[best], cy[best], r[best]
        if score > best_iou:
            best_kind, best_iou = kind, score
    return best_kind, best_iou


@dataclass(frozen=True)
class ImageReading:
    """What one frame shows: background colour, foreground colour and kind, the masks."""

    background: str | None
    foreground: str | None  # dominant colour of the foreground
    kind: str | None  # shape kind of the largest foreground blob
    kind_iou: float  # how well that kind's template fits the blob
    mask: np.ndarray  # (H, W) bool foreground


def _name(index: int) -> str | None:
    return None if index == NO_COLOUR else COLOURS[index]


def read_image(image: np.ndarray, classify: bool = True) -> ImageReading:
    """Read a (H, W, 3) uint8 frame of the shapes world."""
    labels = label_colours(image)
    background = background_colour(labels)
    mask = foreground_mask(labels, background)
    # Blended edges between the shape and the background can land on a third colour: the
    # dominant colour is taken on the eroded foreground when that leaves anything.
    core = erode(mask)
    foreground = dominant_colour(labels, core if core.any() else mask)
    kind, fit = fit_shape(largest_blob(mask)) if classify else (None, 0.0)
    return ImageReading(_name(background), _name(foreground), kind, fit, mask)


def matches_prompt(reading: ImageReading, scene: Scene) -> dict[str, bool]:
    """Which parts of a one-shape scene's prompt the reading matches: colour, shape, background."""
    shape = scene.shapes[0]
    return {
        "colour": reading.foreground == shape.colour,
        "shape": reading.kind == shape.kind,
        "background": reading.background == scene.background,
    }


# ---------------------------------------------------------------------------- motion


def translate(image: np.ndarray, dx: int, dy: int) -> tuple[np.ndarray, np.ndarray]:
    """Content moved by (dx, dy) whole pixels (x right, y down), and the (H, W) bool mask of
    positions the source covers (elsewhere the result is zero)."""
    h, w = image.shape[:2]
    out = np.zeros_like(image)
    valid = np.zeros((h, w), dtype=bool)
    ys = slice(max(dy, 0), min(h + dy, h))
    xs = slice(max(dx, 0), min(w + dx, w))
    src_y = slice(max(-dy, 0), min(h - dy, h))
    src_x = slice(max(-dx, 0), min(w - dx, w))
    out[ys, xs] = image[src_y, src_x]
    valid[ys, xs] = True
    return out, valid


def compensation_candidates(displacement: tuple[float, float], quantum: int) -> list:
    """Whole-pixel displacements to try for a nominal one: the multiples of ``quantum`` (the
    warp's grid, e.g. 8 px for a latent translation) just below and above it on each axis."""
    per_axis = []
    for d in displacement:
        low = math.floor(d / quantum) * quantum
        per_axis.append(sorted({low, low + quantum} if d != low else {low}))
    return [(int(x), int(y)) for x in per_axis[0] for y in per_axis[1]]


@dataclass
class FrameComparison:
    """Frame k against frame 1 moved by the compensated motion."""

    displacement: tuple[int, int]  # the whole-pixel content displacement used
    valid_fraction: float  # share of the frame that frame 1 covers after the translation
    residual: float  # mean Delta E over the covered part (foreground and background)
    background_error: float  # mean Delta E over covered pixels that are background in both
    shape_iou: float  # IoU of the foregrounds on the covered part
    colour_drift: float  # Delta E between the mean foreground colours (eroded masks)


def compare_to_first(
    frames: np.ndarray,
    displacements: Sequence[tuple[float, float]],
    quantum: int = 1,
    background: int | None = None,
) -> list[FrameComparison]:
    """Compare every frame after the first with frame 1 translated by its displacement.

    ``frames`` is (m, H, W, 3) uint8; ``displacements[k]`` the nominal content displacement of
    frame k in pixels. Among the whole-pixel candidates around it (see
    ``compensation_candidates``) the one with the smallest residual is used: the warp's own
    rounding is taken out, anything a single translation cannot explain (duplicated rows,
    re-drawn texture) stays in the residual.
    """
    labels0 = label_colours(frames[0])
    if background is None:
        background = background_colour(labels0)
    fg0 = foreground_mask(labels0, background)
    lab0 = srgb_to_lab(frames[0])
    colour0 = mean_lab(frames[0], erode(fg0))
    out = []
    for k in range(1, len(frames)):
        labels = label_colours(frames[k])
        fg = foreground_mask(labels, background)
        lab = srgb_to_lab(frames[k])
        colour = mean_lab(frames[k], erode(fg))
        drift = math.nan if colour0 is None or colour is None else float(delta_e(colour, colour0))
        best = None
        for dx, dy in compensation_candidates(displacements[k], quantum):
            ref_lab, valid = translate(lab0, dx, dy)
            if valid.mean() < MIN_VALID_FRACTION:
                continue
            error = delta_e(lab, ref_lab)
            residual = float(error[valid].mean())
            if best is None or residual < best[0]:
                best = (residual, (dx, dy), valid, error)
        if best is None:  # the motion carried frame 1 out of the frame
            out.append(FrameComparison((0, 0), 0.0, math.nan, math.nan, math.nan, drift))
            continue
        residual, shift, valid, error = best
        ref_fg, _ = translate(fg0, *shift)
        bg = valid & ~fg & ~ref_fg
        bg_error = float(error[bg].mean()) if bg.any() else math.nan
        shape_iou = iou(fg & valid, ref_fg & valid)
        out.append(
            FrameComparison(shift, float(valid.mean()), residual, bg_error, shape_iou, drift)
        )
    return out


def odd_even_ratio(residuals: Sequence[float]) -> float:
    """Mean residual of odd frames over that of even frames, frames counted from 0 and frame 0
    (the reference) left out: ~1 for a steady video, above 1 when every other frame is off
    (a warp that duplicates rows on odd frames). ``residuals[k - 1]`` belongs to frame k."""
    odd = [r for k, r in enumerate(residuals, start=1) if k % 2 == 1 and not math.isnan(r)]
    even = [r for k, r in enumerate(residuals, start=1) if k % 2 == 0 and not math.isnan(r)]
    if not odd or not even:
        return math.nan
    return float(np.mean(odd) / max(np.mean(even), 1e-6))


def flicker(residuals: Sequence[float]) -> float:
    """Mean |r_k - (r_{k-1} + r_{k+1}) / 2| of the residual series: frames that stand out from
    their neighbours (an isolated scrambled frame, an odd/even alternation)."""
    r = np.asarray([x for x in residuals if not math.isnan(x)], dtype=np.float64)
    if r.size < 3:
        return math.nan
    return float(np.abs(r[1:-1] - (r[:-2] + r[2:]) / 2).mean())
