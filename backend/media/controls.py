"""Control images for ControlNets: control videos, detectors, and OpenPose keypoint files.

A control path ending in ``.json`` holds OpenPose keypoints (``backend.media.pose``) drawn at
the job's size. Otherwise frames are read from a folder or movie and optionally run
through a detector: ``canny`` needs only OpenCV; ``openpose`` and ``depth`` use
controlnet-aux, an optional extra imported only when asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import cache

import cv2
import numpy as np

from ..protocol import ControlNetSpec
from .video_io import FrameStore, iter_frames, source_indices, spool_frames

# Canny thresholds of the reference ControlNet canny annotator.
CANNY_LOW, CANNY_HIGH = 100, 200
ANNOTATORS_REPO = "lllyasviel/Annotators"


class DetectorUnavailableError(RuntimeError):
    """A detector needs a package that is not installed in the backend environment."""


def canny(image: np.ndarray) -> np.ndarray:
    """White Canny edges on black, as the SD 1.5 canny ControlNet expects."""
    edges = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), CANNY_LOW, CANNY_HIGH)
    return np.repeat(edges[:, :, None], 3, axis=2)


@cache
def _aux_detector(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """A controlnet-aux detector, loaded once per process."""
    try:
        import controlnet_aux
    except Exception as exc:  # also fails when torchvision is missing
        raise DetectorUnavailableError(
            f"detector {name!r} needs controlnet-aux in the backend environment "
            f"(pip install controlnet-aux; it also needs torchvision): {exc}. "
            "Use detector 'canny', or give ready control images or OpenPose keypoints."
        ) from exc
    cls = {"openpose": controlnet_aux.OpenposeDetector, "depth": controlnet_aux.MidasDetector}[name]
    detector = cls.from_pretrained(ANNOTATORS_REPO)
    return lambda image: np.asarray(detector(image, output_type="np"))


def apply_detector(name: str, image: np.ndarray) -> np.ndarray:
    """Turn an RGB frame into a control image with detector ``name`` ("none" keeps it)."""
    if name == "none":
        return image
    if name == "canny":
        return canny(image)
    result = _aux_detector(name)(image)
    if result.shape[:2] != image.shape[:2]:
        result = cv2.resize(
            result, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR
        )
    return result


def iter_control_frames(
    spec: ControlNetSpec, frame_ids: Sequence[int], width: int, height: int, fit: str = "crop"
) -> Iterator[tuple[list[int], np.ndarray]]:
    """RGB uint8 control images (height, width, 3) one at a time, each with the output
    ``frame_ids`` that use it (see video_io.iter_frames). Keypoint files are drawn at the
    job's size (their coordinates are fractions of the frame: ``fit`` does not apply)."""
    path = spec.control.path
    if path.lower().endswith(".json"):
        from .pose import draw_openpose, load_pose_file

        poses = load_pose_file(path)  # keypoints of every frame (small); drawn one at a time
        users: dict[int, list[int]] = {}
        for f, i in source_indices(spec.control, frame_ids).items():
            users.setdefault(i, []).append(f)
        last = max(users)
        if last >= len(poses):
            raise ValueError(f"pose file {path} has {len(poses)} frames; frame {last} is needed")
        for i in sorted(users):
            yield users[i], draw_openpose(poses[i], width, height)
        return
    for fs, image in iter_frames(spec.control, frame_ids, width, height, fit):
        yield fs, apply_detector(spec.detector, image)


def load_control_frames(
    spec: ControlNetSpec, frame_ids: Sequence[int], width: int, height: int, fit: str = "crop"
) -> dict[int, np.ndarray]:
    """RGB uint8 control images (height, width, 3) for the 0-based ``frame_ids``."""
    frames = {
        f: image
        for fs, image in iter_control_frames(spec, frame_ids, width, height, fit)
        for f in fs
    }
    return {f: frames[f] for f in frame_ids}


def store_control_frames(
    spec: ControlNetSpec, frame_ids: Sequence[int], width: int, height: int, fit: str = "crop"
) -> FrameStore:
    """The control images spooled into a FrameStore: read back per chunk while denoising."""
    return spool_frames(iter_control_frames(spec, frame_ids, width, height, fit), width, height)
