"""OpenPose keypoint files: load, validate, and draw them as ControlNet control images.

A pose file (``*.json``) holds ``{"format": "openpose18", "frames": [frame, ...]}``; a frame
is a list of people, a person a list of 18 keypoints in OpenPose COCO-18 order, each
``null`` (left out) or ``[x, y]`` normalised to the frame (x right, y down, 0..1).
Drawing follows the OpenPose / ControlNet annotator convention: 17 limbs as filled
ellipses blended at 0.6 over the canvas, then 18 keypoint circles, on black, in RGB.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import cv2
import numpy as np

from ..protocol import (
    KEYPOINT_NAMES,
    POSE_BASE_SIDE,
    POSE_BASE_WIDTH,
    POSE_COLORS,
    POSE_FORMAT,
    POSE_LIMB_ALPHA,
    POSE_LIMBS,
    shown,
)

# The largest pose file read: 18 keypoints of 4 people a frame, as JSON, come to ~1 KB a
# frame, so 64 MB holds tens of thousands of frames; a link to /dev/zero or a 7 GB file is
# refused before it is read.
MAX_POSE_BYTES = 64 << 20

# The drawing's tables live in the protocol, which the add-on's preview reads too.
LIMBS, COLORS, LIMB_ALPHA = POSE_LIMBS, POSE_COLORS, POSE_LIMB_ALPHA


def _bad(where: str, message: str) -> ValueError:
    return ValueError(f"pose file {where}: {message}")


def _keypoint(where: str, value: object) -> tuple[float, float] | None:
    """One keypoint: None or an (x, y) pair of finite numbers in 0..1."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _bad(where, f"expected null or [x, y], got {shown(value)}")
    coords = []
    for axis, v in zip("xy", value, strict=True):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _bad(f"{where}.{axis}", f"expected a finite number, got {shown(v)}")
        if not 0.0 <= v <= 1.0:
            raise _bad(f"{where}.{axis}", f"must be within 0..1 (leave it null instead), got {v!r}")
        coords.append(float(v))
    return coords[0], coords[1]


def _person(where: str, value: object) -> list[tuple[float, float] | None]:
    """One person: exactly 18 keypoints in COCO-18 order."""
    if not isinstance(value, list) or len(value) != len(KEYPOINT_NAMES):
        got = f"{len(value)} entries" if isinstance(value, list) else shown(value)
        raise _bad(where, f"expected a list of {len(KEYPOINT_NAMES)} keypoints, got {got}")
    return [_keypoint(f"{where}[{i}] ({KEYPOINT_NAMES[i]})", v) for i, v in enumerate(value)]


def parse_pose_data(data: object, where: str = "") -> list[list[list[tuple[float, float] | None]]]:
    """Validate parsed pose JSON and return its frames (lists of people of 18 keypoints)."""
    prefix = f"{where} " if where else ""
    if not isinstance(data, dict):
        raise _bad(f"{prefix}root", f"expected an object, got {type(data).__name__}")
    unknown = sorted(set(data) - {"format", "frames"})
    if unknown:
        raise _bad(f"{prefix}{shown(unknown[0])}", "unknown field")
    if data.get("format") != POSE_FORMAT:
        raise _bad(f"{prefix}format", f"expected {POSE_FORMAT!r}, got {shown(data.get('format'))}")
    frames = data.get("frames")
    if not isinstance(frames, list) or not frames:
        raise _bad(f"{prefix}frames", f"expected a non-empty list of frames, got {shown(frames)}")
    result = []
    for f, people in enumerate(frames):
        if not isinstance(people, list):
            raise _bad(f"{prefix}frames[{f}]", f"expected a list of people, got {shown(people)}")
        result.append([_person(f"{prefix}frames[{f}][{p}]", v) for p, v in enumerate(people)])
    return result


def read_regular_file(path: Path, limit: int, what: str) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes; ValueError
    naming it otherwise. Never blocks on a FIFO, never reads a device (/dev/zero) endlessly."""
    try:
        # O_NONBLOCK: opening a FIFO with no writer would wait forever; a regular file ignores it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)  # of what was opened, links followed: no swap after a check
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{what} {path} is not a regular file (a device, FIFO or folder)")
        if info.st_size > limit:
            raise ValueError(f"{what} {path} is {info.st_size} bytes; the limit is {limit} bytes")
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew while being read
        raise ValueError(f"{what} {path} is larger than the limit of {limit} bytes")
    return data


def load_pose_file(path: str | Path) -> list[list[list[tuple[float, float] | None]]]:
    """Read and validate a pose file; ValueError names the file and the bad value."""
    path = Path(path)
    data = read_regular_file(path, MAX_POSE_BYTES, "pose file")
    try:
        parsed = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"pose file {path} is not UTF-8 text (byte {exc.start})") from None
    except RecursionError:
        raise ValueError(f"pose file {path} is nested too deeply to be JSON") from None
    except json.JSONDecodeError as exc:  # its message holds a position, never the content
        raise ValueError(f"pose file {path} is not valid JSON: {exc}") from None
    return parse_pose_data(parsed, where=str(path))


def stroke_width(width: int, height: int) -> int:
    """Limb half-width and keypoint radius in pixels, scaled like the 512 px annotator."""
    return max(1, round(POSE_BASE_WIDTH * min(width, height) / POSE_BASE_SIDE))


def _to_pixels(point: tuple[float, float], width: int, height: int) -> tuple[float, float]:
    return point[0] * width, point[1] * height


def _draw_limb(canvas: np.ndarray, a: tuple, b: tuple, color: tuple, stick: int) -> None:
    """Blend one limb ellipse from pixel point a to b into the canvas at LIMB_ALPHA."""
    (x0, y0), (x1, y1) = a, b
    length = math.hypot(x1 - x0, y1 - y0)
    angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
    center = (int(round((x0 + x1) / 2)), int(round((y0 + y1) / 2)))
    polygon = cv2.ellipse2Poly(
        center, (int(round(length / 2)), stick), int(round(angle)), 0, 360, 1
    )
    mask = np.zeros(canvas.shape[:2], np.uint8)
    cv2.fillConvexPoly(mask, polygon, 1)
    inside = mask.astype(bool)
    blended = (1.0 - LIMB_ALPHA) * canvas[inside] + LIMB_ALPHA * np.asarray(color, np.float32)
    canvas[inside] = blended.astype(np.uint8)


def draw_openpose(people: list, width: int, height: int) -> np.ndarray:
    """Draw people (each 18 keypoints or None) as an OpenPose image, (H, W, 3) uint8 RGB."""
    if width < 1 or height < 1:
        raise ValueError(f"draw_openpose: size must be positive, got {width}x{height}")
    canvas = np.zeros((height, width, 3), np.uint8)
    stick = stroke_width(width, height)
    pixel_people = [
        [None if p is None else _to_pixels(p, width, height) for p in person] for person in people
    ]
    for i, (ka, kb) in enumerate(LIMBS):
        for person in pixel_people:
            if person[ka] is not None and person[kb] is not None:
                _draw_limb(canvas, person[ka], person[kb], COLORS[i], stick)
    for person in pixel_people:
        for i, point in enumerate(person):
            if point is not None:
                center = (int(round(point[0])), int(round(point[1])))
                cv2.circle(canvas, center, stick, COLORS[i], thickness=-1)
    return canvas


def render_pose_frames(path: str | Path, width: int, height: int) -> list[np.ndarray]:
    """Load a pose file and draw every frame at width x height (RGB uint8 arrays)."""
    return [draw_openpose(people, width, height) for people in load_pose_file(path)]


def write_pose_file(path: str | Path, frames: list) -> Path:
    """Validate frames and write them as a pose file (used by tests and tools)."""
    parse_pose_data({"format": POSE_FORMAT, "frames": frames})
    path = Path(path)
    path.write_text(json.dumps({"format": POSE_FORMAT, "frames": frames}), encoding="utf-8")
    return path
