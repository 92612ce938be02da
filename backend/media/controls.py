"""Control images for ControlNets: control videos, detectors, and OpenPose keypoint files.

A control path ending in ``.json`` holds OpenPose keypoints (``backend.media.pose``) drawn at
the job's size. Otherwise frames are read from a folder or movie and optionally run
through a detector: ``canny`` needs only OpenCV; ``openpose`` and ``depth`` run transformers
models from safetensors (``backend.media.detectors``), a batch of frames at a time; ``hed``,
``lineart`` and ``mlsd`` exist only in controlnet-aux, an optional extra imported only when
asked for, whose pickled weights load only where pickles are allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import cache

import cv2
import numpy as np

from ..protocol import AUX_DETECTORS, MODEL_DETECTORS, ControlNetSpec, DetectorPreview
from .detectors import DetectorRun
from .video_io import FrameStore, iter_frames, source_indices, spool_frames

# Canny thresholds of the reference ControlNet canny annotator.
CANNY_LOW, CANNY_HIGH = 100, 200
ANNOTATORS_REPO = "lllyasviel/Annotators"


class DetectorUnavailableError(RuntimeError):
    """A detector needs a package that is not installed in the backend environment, or
    pickled weights where pickles are not allowed."""


def canny(image: np.ndarray) -> np.ndarray:
    """White Canny edges on black, as the SD 1.5 canny ControlNet expects."""
    edges = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), CANNY_LOW, CANNY_HIGH)
    return np.repeat(edges[:, :, None], 3, axis=2)


def aux_pickle_refusal(name: str) -> str:
    """Why controlnet-aux detector ``name`` does not run without pickles allowed."""
    return (
        f"detector {name!r} comes only from controlnet-aux, which loads pickled .pth weights "
        f"({ANNOTATORS_REPO}) with torch.load: loading them can run arbitrary code, so it "
        "runs only with --allow-pickle (or Allow Pickled Weights in the add-on's "
        f"preferences). {', '.join(MODEL_DETECTORS)} and canny load no pickles."
    )


@cache
def _aux_detector(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """A controlnet-aux detector, loaded once per process (pickled weights: see callers)."""
    try:
        import controlnet_aux
    except Exception as exc:  # also fails when torchvision is missing
        raise DetectorUnavailableError(
            f"detector {name!r} needs controlnet-aux in the backend environment "
            f"(pip install controlnet-aux; it also needs torchvision): {exc}. "
            f"Use detector canny, {' or '.join(MODEL_DETECTORS)}, or give ready control "
            "images or OpenPose keypoints."
        ) from exc
    cls = {
        "hed": controlnet_aux.HEDdetector,
        "lineart": controlnet_aux.LineartDetector,
        "mlsd": controlnet_aux.MLSDdetector,
    }[name]
    detector = cls.from_pretrained(ANNOTATORS_REPO)
    return lambda image: np.asarray(detector(image, output_type="np"))


def apply_detector(
    name: str,
    image: np.ndarray,
    run: DetectorRun | None = None,
    models: dict[str, str] | None = None,
    allow_pickle: bool = False,
) -> np.ndarray:
    """Turn an RGB frame into a control image with detector ``name`` ("none" keeps it);
    ``models`` replaces a model detector's weights by role, ``run`` loads and caches them."""
    return apply_detector_batch(name, [image], run, models, allow_pickle)[0]


def apply_detector_batch(
    name: str,
    images: list[np.ndarray],
    run: DetectorRun | None = None,
    models: dict[str, str] | None = None,
    allow_pickle: bool = False,
) -> list[np.ndarray]:
    """``apply_detector`` on several frames: model detectors run them in one batch."""
    if name == "none":
        return list(images)
    if name == "canny":
        return [canny(image) for image in images]
    if name in MODEL_DETECTORS:
        return (run or DetectorRun())(name, models, images)
    if name in AUX_DETECTORS and not allow_pickle:
        raise DetectorUnavailableError(aux_pickle_refusal(name))
    return [_fit_to(_aux_detector(name)(image), image) for image in images]


def _fit_to(result: np.ndarray, image: np.ndarray) -> np.ndarray:
    """A detector's output resized to the frame it came from."""
    if result.shape[:2] != image.shape[:2]:
        result = cv2.resize(
            result, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR
        )
    return result


def iter_control_frames(
    spec: ControlNetSpec,
    frame_ids: Sequence[int],
    width: int,
    height: int,
    fit: str = "crop",
    run: DetectorRun | None = None,
    allow_pickle: bool = False,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """RGB uint8 control images (height, width, 3) one at a time, each with the output
    ``frame_ids`` that use it (see video_io.iter_frames). Keypoint files are drawn at the
    job's size (their coordinates are fractions of the frame: ``fit`` does not apply).
    Model detectors take frames a batch at a time (``run.batch``)."""
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
    run = run or DetectorRun()
    size = run.batch if spec.detector in MODEL_DETECTORS else 1
    batch: list[tuple[list[int], np.ndarray]] = []
    for item in iter_frames(spec.control, frame_ids, width, height, fit):
        batch.append(item)
        if len(batch) >= size:
            yield from _detected(spec, batch, run, allow_pickle)
            batch = []
    yield from _detected(spec, batch, run, allow_pickle)


def _detected(
    spec: ControlNetSpec,
    batch: list[tuple[list[int], np.ndarray]],
    run: DetectorRun,
    allow_pickle: bool,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """A batch of (output frames, frame) through the spec's detector."""
    if not batch:
        return
    images = [image for _, image in batch]
    outs = apply_detector_batch(spec.detector, images, run, spec.detector_models, allow_pickle)
    for (fs, _), out in zip(batch, outs, strict=True):
        yield fs, out


def load_control_frames(
    spec: ControlNetSpec,
    frame_ids: Sequence[int],
    width: int,
    height: int,
    fit: str = "crop",
    run: DetectorRun | None = None,
    allow_pickle: bool = False,
) -> dict[int, np.ndarray]:
    """RGB uint8 control images (height, width, 3) for the 0-based ``frame_ids``."""
    frames = {
        f: image
        for fs, image in iter_control_frames(spec, frame_ids, width, height, fit, run, allow_pickle)
        for f in fs
    }
    return {f: frames[f] for f in frame_ids}


def store_control_frames(
    spec: ControlNetSpec,
    frame_ids: Sequence[int],
    width: int,
    height: int,
    fit: str = "crop",
    run: DetectorRun | None = None,
    allow_pickle: bool = False,
) -> FrameStore:
    """The control images spooled into a FrameStore: read back per chunk while denoising."""
    frames = iter_control_frames(spec, frame_ids, width, height, fit, run, allow_pickle)
    return spool_frames(frames, width, height)


def detector_preview(
    request: DetectorPreview, run: DetectorRun | None = None, allow_pickle: bool = False
) -> np.ndarray:
    """The control image a job would get for one frame (a preview_detector request)."""
    spec = ControlNetSpec(
        model="(preview)",
        control=request.control,
        detector=request.detector,
        detector_models=request.detector_models,
    )
    frame = request.frame
    size = (request.width, request.height)
    return load_control_frames(spec, [frame], *size, request.fit, run, allow_pickle)[frame]
