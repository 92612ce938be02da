"""The OpenPose pass as a picture, for the panel's preview, with numpy alone (no cv2 in
Blender): the backend's drawing (backend/media/pose.py) rasterised the same way.

The backend draws the control image the model sees; this is only what the artist checks
before a generation. Its tables are the protocol's, as the backend's drawing uses them (the
add-on never imports that drawing, which needs cv2); tests compare the two pictures.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from ... import backend_paths
from ..errors import SceneControlError
from ..files import write_png

# The backend's drawing tables, read from the protocol (standard library only).
_PROTOCOL = backend_paths.load_protocol()
LIMBS, COLORS, LIMB_ALPHA = _PROTOCOL.POSE_LIMBS, _PROTOCOL.POSE_COLORS, _PROTOCOL.POSE_LIMB_ALPHA
BASE_WIDTH, BASE_SIDE = _PROTOCOL.POSE_BASE_WIDTH, _PROTOCOL.POSE_BASE_SIDE
# cv2's filled polygon also takes the pixels its outline crosses: the ellipse reaches
# about this much further (see tests/addon/scene_control/test_pose_preview.py).
GROW = 0.5


def stroke_width(width: int, height: int) -> int:
    """Limb half-width and keypoint radius in pixels, scaled like the 512 px annotator."""
    return max(1, round(BASE_WIDTH * min(width, height) / BASE_SIDE))


def _limb_mask(shape: tuple[int, int], a: tuple, b: tuple, stick: int) -> np.ndarray:
    """The pixels (centres at whole coordinates) inside the ellipse from a to b whose
    half-axes are half the limb's length and ``stick``."""
    (x0, y0), (x1, y1) = a, b
    # The backend's ellipse: whole-pixel centre and half-length, whole degrees.
    half = round(math.hypot(x1 - x0, y1 - y0) / 2.0)
    cx, cy = round((x0 + x1) / 2.0), round((y0 + y1) / 2.0)
    angle = math.radians(round(math.degrees(math.atan2(y0 - y1, x0 - x1))))
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]  # (H, W) pixel coordinates
    dx, dy = xs - cx, ys - cy
    along = (dx * math.cos(angle) + dy * math.sin(angle)) / (half + GROW)
    across = (-dx * math.sin(angle) + dy * math.cos(angle)) / (stick + GROW)
    return along * along + across * across <= 1.0


def draw_pose(people: list, width: int, height: int) -> np.ndarray:
    """People (each 18 keypoints, ``None`` or normalised (x, y)) as an OpenPose picture,
    (H, W, 3) uint8 RGB, top row first: limbs blended at LIMB_ALPHA, then keypoints."""
    if width < 1 or height < 1:
        raise SceneControlError(f"pose preview: size must be positive, got {width}x{height}")
    canvas = np.zeros((height, width, 3), np.uint8)
    stick = stroke_width(width, height)
    pixels = [
        [None if p is None else (p[0] * width, p[1] * height) for p in person] for person in people
    ]
    for i, (ka, kb) in enumerate(LIMBS):
        for person in pixels:
            if person[ka] is None or person[kb] is None:
                continue
            inside = _limb_mask(canvas.shape[:2], person[ka], person[kb], stick)
            color = np.asarray(COLORS[i], np.float32)
            blended = (1.0 - LIMB_ALPHA) * canvas[inside] + LIMB_ALPHA * color
            canvas[inside] = blended.astype(np.uint8)
    ys, xs = np.mgrid[0:height, 0:width]  # (H, W) pixel coordinates
    for person in pixels:
        for i, point in enumerate(person):
            if point is None:
                continue
            cx, cy = round(point[0]), round(point[1])
            canvas[(xs - cx) ** 2 + (ys - cy) ** 2 <= stick * stick] = COLORS[i]
    return canvas


def pose_preview(
    pose_file: str | os.PathLike, width: int, height: int, out: str | os.PathLike, frame: int = 0
) -> Path:
    """Draw frame ``frame`` of an ``openpose18`` pose file as a PNG at ``out``."""
    try:
        frames = json.loads(Path(pose_file).read_text(encoding="utf-8"))["frames"]
        people = frames[frame]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise SceneControlError(f"pose file {pose_file}: no frame {frame} to draw ({exc})") from exc
    picture = draw_pose(people, width, height)
    return write_png(out, picture.astype(np.float32) / 255.0)
