"""Motion between consecutive frames for flow-guided consistency (engine/flow.py).

Two sources:

* estimated from a video (the pix2pix source, or a control video) with OpenCV's DIS optical
  flow (Kroeger et al., "Fast Optical Flow using Dense Inverse Search", ECCV 2016), forward
  and backward between consecutive frames, the occlusion from their consistency;
* read from a folder of ``.npy`` motion-vector frames (one a frame, in name order), each
  (H, W, 2): frame k's motion to frame k - 1, or (H, W, 4): to the previous frame then to
  the next one; pixels, x right and y down. With 4 channels the visible pixels come from
  forward-backward consistency, with 2 only from the frame's edges. Blender's Vector pass
  (Cycles, ``ViewLayer.Vector.X/Y/Z/W``, pixels, y up) maps onto it as (X, -Y, -Z, W): X/Y
  is the offset to the previous frame's position, Z/W the current position minus the next
  one (measured on a rendered moving cube, where it agrees with the DIS estimate within
  half a pixel: tests/addon/scene_control/test_vector_pass.py);
* or from a folder of OpenEXR frames as Blender saves that pass (read by ``media/exr.py``,
  mapped the same way): a multilayer file's Vector layer (``ViewLayer.Vector.X/Y/Z/W`` from
  the render output, ``Vector.X/Y/Z/W`` or ``Vector.R/G/B/A`` from a File Output node), or a
  single-layer file whose channels X, Y, Z, W or R, G, B, A are the pass.

Either way the engine gets, per frame k >= 1, a (3, h, w) tensor at the latent grid: the
backward flow k -> k - 1 in latent pixels and where frame k is visible in frame k - 1.
Frames are read and estimated only when the engine first asks for them and kept at latent
size (3 floats a latent pixel, less than the latents the engine keeps anyway).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from ..engine.flow import inside, resize_flow, resize_mask, visibility
from .exr import channel_names, read_channels
from .video_io import MAX_INPUT_PIXELS

FLOW_SUFFIXES = (".npy", ".exr")


class FlowError(ValueError):
    """A motion-vector folder or file is missing or malformed; the message names it."""


def estimate_flow(image: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(H, W, 2) float32 DIS flow: ``image`` at p matches ``target`` at p + flow[p]."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    gray = [cv2.cvtColor(np.ascontiguousarray(i), cv2.COLOR_RGB2GRAY) for i in (image, target)]
    return dis.calc(gray[0], gray[1], None)


def _tensor(flow: np.ndarray) -> torch.Tensor:
    """(H, W, 2) numpy -> (1, 2, H, W) float32 torch."""
    return torch.from_numpy(np.ascontiguousarray(flow, dtype=np.float32)).permute(2, 0, 1)[None]


def pixel_flow(backward: np.ndarray, forward: np.ndarray | None) -> torch.Tensor:
    """(3, H, W): frame k's backward flow and its visibility at full resolution (for the
    final pixel-space fusion, engine/flow.py FrameFusion); ``forward`` as in latent_flow."""
    b = _tensor(backward)  # (1, 2, H, W)
    visible = inside(b) if forward is None else visibility(b, _tensor(forward))  # (1, 1, H, W)
    return torch.cat([b, visible], dim=1)[0]


def latent_flow(
    backward: np.ndarray, forward: np.ndarray | None, size: tuple[int, int]
) -> torch.Tensor:
    """(3, h, w): frame k's backward flow at the latent grid ``size`` and its visibility.

    ``backward`` (H, W, 2) is frame k's flow to k - 1, ``forward`` frame k - 1's flow to k
    (None: visibility only from the frame's edges). Visibility is found at full resolution;
    a latent pixel counts as visible only when nearly all of its pixels are.
    """
    b = _tensor(backward)  # (1, 2, H, W)
    visible = inside(b) if forward is None else visibility(b, _tensor(forward))  # (1, 1, H, W)
    small = resize_flow(b, size)  # (1, 2, h, w) in latent pixels
    return torch.cat([small, resize_mask(visible, size)], dim=1)[0]  # (3, h, w)


class _LatentFlows(Mapping[int, torch.Tensor]):
    """Frame k >= 1 -> (3, h, w) latent flow and visibility, computed on first use."""

    def __init__(self, frames: Sequence[int], size: tuple[int, int]):
        self.frames = [f for f in frames if f >= 1]
        self.size = size
        self.done: dict[int, torch.Tensor] = {}

    def compute(self, frame: int) -> torch.Tensor:
        raise NotImplementedError

    def pair(self, frame: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Frame k's (H, W, 2) backward flow and frame k - 1's forward flow (or None)."""
        raise NotImplementedError

    def pixels(self, frame: int) -> torch.Tensor:
        """Frame k's (3, H, W) flow and visibility at full resolution, computed afresh (not
        kept: 12 bytes a pixel)."""
        if frame not in self.frames:
            raise KeyError(frame)
        return pixel_flow(*self.pair(frame))

    def __getitem__(self, frame: int) -> torch.Tensor:
        if frame not in self.frames:
            raise KeyError(frame)
        if frame not in self.done:
            self.done[frame] = self.compute(frame)
        return self.done[frame]

    def __contains__(self, frame: object) -> bool:
        return frame in self.frames

    def __iter__(self) -> Iterator[int]:
        return iter(self.frames)

    def __len__(self) -> int:
        return len(self.frames)


class EstimatedFlows(_LatentFlows):
    """DIS flow between consecutive frames of ``video`` (frame index -> (H, W, 3) uint8)."""

    def __init__(
        self, video: Mapping[int, np.ndarray], frames: Sequence[int], size: tuple[int, int]
    ):
        super().__init__(frames, size)
        self.video = video

    def pair(self, frame: int) -> tuple[np.ndarray, np.ndarray]:
        current, previous = self.video[frame], self.video[frame - 1]
        return estimate_flow(current, previous), estimate_flow(previous, current)

    def compute(self, frame: int) -> torch.Tensor:
        return latent_flow(*self.pair(frame), self.size)


def flow_files(folder: str | os.PathLike, count: int) -> list[Path]:
    """The first ``count`` ``.npy`` or ``.exr`` files of a motion-vector folder, in name order;
    one kind a folder."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FlowError(f"flow_source: {path} is not a folder of .npy or .exr flow frames")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FLOW_SUFFIXES)
    kinds = sorted({p.suffix.lower() for p in files})
    if len(kinds) > 1:
        raise FlowError(
            f"flow_source: {path} holds both .npy and .exr frames ({files[0].name}, ...); "
            "keep one kind in the folder"
        )
    if len(files) < count:
        kind = kinds[0] if kinds else ".npy or .exr"
        raise FlowError(
            f"flow_source: {path} holds {len(files)} {kind} frames, the job needs {count}"
        )
    return files[:count]


def _complete(prefixes: list[str], names: set[str]) -> list[tuple[str, str, str, str]]:
    """Each prefix's X, Y, Z, W or R, G, B, A channel names that are all in ``names``."""
    return [
        (p + letters[0], p + letters[1], p + letters[2], p + letters[3])
        for p in prefixes
        for letters in ("XYZW", "RGBA")
        if all(p + c in names for c in letters)
    ]


def _vector_layer(parts: list[list[str]]) -> tuple[str, str, str, str]:
    """The 4 channel names of the Vector pass among an OpenEXR file's channels (see the
    module docstring); ValueError saying what is there when there is none or several."""
    names = {n for part in parts for n in part}
    layers = sorted({n.rsplit(".", 1)[0] + "." for n in names if "." in n})
    layers = [p for p in layers if p == "Vector." or p.endswith(".Vector.")]
    found = _complete(layers or [""], names)
    if len(found) > 1:
        raise ValueError(f"it holds several Vector passes ({', '.join(f[0] for f in found)})")
    if found:
        return found[0]
    partial = layers or ([""] if {"X", "Y", "Z"} <= names else [])
    if partial:  # a File Output node's vector input keeps 3 dimensions unless told 4
        held = sorted(n for n in names if n.startswith(tuple(partial)))
        raise ValueError(
            f"its Vector pass has the channels {', '.join(held)}; the pass has 4 (X, Y, Z, "
            "W): in a File Output node set the input's dimensions to 4"
        )
    raise ValueError(
        f"it holds no Vector pass (channels: {', '.join(sorted(names)[:12])}); save Blender's "
        "Vector pass as OpenEXR MultiLayer (the render output, or a File Output node), or as "
        "a single-layer float OpenEXR whose 4 channels are the pass"
    )


def read_exr_vectors(path: Path) -> np.ndarray:
    """(H, W, 4) float32 (X, -Y, -Z, W) from the Vector pass of an OpenEXR frame."""
    try:
        names = _vector_layer(channel_names(path))
        channels = read_channels(path, names, MAX_INPUT_PIXELS)
    except (OSError, ValueError) as exc:  # ExrError is a ValueError
        raise FlowError(f"flow_source: cannot read {path}: {exc}") from exc
    x, y, z, w = (channels[n] for n in names)
    return np.stack([x, -y, -z, w], axis=-1)


def _read_npy(path: Path) -> np.ndarray:
    """A (H, W, 2 or 4) float array from a .npy frame."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise FlowError(f"flow_source: cannot read {path}: {exc}") from exc


def read_vectors(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A (H, W, 2 or 4) float motion-vector frame, rescaled to ``size`` (height, width) pixels."""
    data = read_exr_vectors(path) if path.suffix.lower() == ".exr" else _read_npy(path)
    if data.ndim != 3 or data.shape[2] not in (2, 4) or data.dtype.kind != "f":
        raise FlowError(
            f"flow_source: {path} must hold (height, width, 2 or 4) floats, got "
            f"{data.shape} {data.dtype}"
        )
    if not np.isfinite(data).all():
        raise FlowError(f"flow_source: {path} holds NaN or infinite values")
    h, w = data.shape[:2]
    if (h, w) != size:  # vectors are in pixels of their own grid: scale them with it
        data = cv2.resize(data.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_AREA)
        data = data * np.tile([size[1] / w, size[0] / h], data.shape[2] // 2).astype(np.float32)
    return data.astype(np.float32)


class FileFlows(_LatentFlows):
    """Motion vectors read from a folder (see the module docstring), frame k = k-th file."""

    def __init__(
        self,
        folder: str | os.PathLike,
        frames: Sequence[int],
        size: tuple[int, int],
        pixels: tuple[int, int],
    ):
        super().__init__(frames, size)
        self.files = flow_files(folder, max(frames) + 1)
        self.frame_size = pixels  # (height, width) of the job's frames

    def pair(self, frame: int) -> tuple[np.ndarray, np.ndarray | None]:
        current = read_vectors(self.files[frame], self.frame_size)
        previous = read_vectors(self.files[frame - 1], self.frame_size)
        forward = previous[..., 2:4] if current.shape[2] == 4 == previous.shape[2] else None
        return current[..., :2], forward

    def compute(self, frame: int) -> torch.Tensor:
        return latent_flow(*self.pair(frame), self.size)


class GivenFlows(_LatentFlows):
    """Flows given as arrays: frame k -> (backward (H, W, 2), forward (H, W, 2) or None)."""

    def __init__(
        self, pairs: Mapping[int, tuple[np.ndarray, np.ndarray | None]], size: tuple[int, int]
    ):
        super().__init__([0, *pairs], size)
        self.pairs = pairs

    def pair(self, frame: int) -> tuple[np.ndarray, np.ndarray | None]:
        return self.pairs[frame]

    def compute(self, frame: int) -> torch.Tensor:
        return latent_flow(*self.pair(frame), self.size)
