"""The model detectors: OpenPose images from VitPose keypoints, depth from Depth Anything.

``openpose``: RT-DETR finds the people in a frame, VitPose estimates each one's 17 COCO
keypoints, and ``coco_to_openpose`` turns them into the OpenPose 18-point layout the SD 1.5
and SDXL OpenPose ControlNets were trained on (the neck is the midpoint of the shoulders;
points under KEYPOINT_THRESHOLD are left out). ``backend.media.pose.draw_openpose`` draws
them at the job's size: the renderer the armature scene pass uses, so both look alike.
``depth``: Depth Anything's relative inverse depth, scaled per frame so near is bright.

Frames run in batches of DETECT_BATCH, and each output is kept (OUTPUT_CACHE_BYTES, per
process: the worker's) by detector, weights, job size and the frame's pixels, so a
regenerate does not run the models again. Weights: ``backend.models.detectors``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..protocol import MODEL_DETECTORS, detector_models
from .pose import draw_openpose

log = logging.getLogger(__name__)

# Person boxes scoring below this are ignored: the threshold of transformers' VitPose
# example (RT-DETR detections at 0.3, then VitPose in each box).
PERSON_THRESHOLD = 0.3
# Keypoints scoring below this are left out of the drawing: the keypoint threshold of
# transformers' VitPose visualisation example.
KEYPOINT_THRESHOLD = 0.3
# Frames per detector call (one call per frame would leave a GPU mostly idle).
DETECT_BATCH = 8
# Detector outputs kept per process: 256 MB is ~340 frames at 512x512.
OUTPUT_CACHE_BYTES = 256 << 20

# COCO-17 keypoint index for each OpenPose-18 keypoint (protocol.KEYPOINT_NAMES order);
# None: the neck, which COCO lacks (the midpoint of the shoulders instead).
COCO_FOR_OPENPOSE = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
COCO_LEFT_SHOULDER, COCO_RIGHT_SHOULDER = 5, 6
# Said once per job when a control frame shows nobody (the frame stays black).
NOBODY = "openpose: no person found in some control frames; they stay black (no pose)"


def coco_to_openpose(
    keypoints: np.ndarray,
    scores: np.ndarray,
    width: int,
    height: int,
    threshold: float = KEYPOINT_THRESHOLD,
) -> list[tuple[float, float] | None]:
    """One person's COCO-17 keypoints (pixels (17, 2), scores (17,)) as 18 OpenPose points
    normalised to the frame, None where the score is under ``threshold`` or off the frame."""
    keypoints = np.asarray(keypoints, np.float64)
    scores = np.asarray(scores, np.float64)
    if keypoints.shape != (17, 2) or scores.shape != (17,):
        raise ValueError(
            f"coco_to_openpose: expected (17, 2) keypoints and (17,) scores, got "
            f"{keypoints.shape} and {scores.shape}"
        )

    def point(xy: np.ndarray) -> tuple[float, float] | None:
        x, y = float(xy[0]) / width, float(xy[1]) / height
        return (x, y) if 0.0 <= x <= 1.0 and 0.0 <= y <= 1.0 else None

    shown = scores >= threshold
    people: list[tuple[float, float] | None] = []
    for coco in COCO_FOR_OPENPOSE:
        if coco is None:
            both = shown[COCO_LEFT_SHOULDER] and shown[COCO_RIGHT_SHOULDER]
            neck = (keypoints[COCO_LEFT_SHOULDER] + keypoints[COCO_RIGHT_SHOULDER]) / 2
            people.append(point(neck) if both else None)
        else:
            people.append(point(keypoints[coco]) if shown[coco] else None)
    return people


def openpose_people(
    poses: Sequence[tuple[np.ndarray, np.ndarray]], width: int, height: int
) -> list[list[tuple[float, float] | None]]:
    """OpenPose people from (keypoints, scores) per detected person; nobody left out unless
    none of their points is shown."""
    people = [coco_to_openpose(k, s, width, height) for k, s in poses]
    return [person for person in people if any(p is not None for p in person)]


def depth_to_image(depth: np.ndarray) -> np.ndarray:
    """Relative inverse depth (H, W; larger is nearer, as Depth Anything predicts) as an
    (H, W, 3) uint8 image, scaled to the frame's range: near is bright, far is dark."""
    depth = np.asarray(depth, np.float64)
    lo, hi = float(depth.min()), float(depth.max())
    if not np.isfinite([lo, hi]).all() or hi - lo <= 0:
        gray = np.zeros(depth.shape, np.uint8)  # flat or broken: no depth to show
    else:
        gray = np.round((depth - lo) / (hi - lo) * 255.0).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def weights_used(detector: str, overrides: dict[str, str] | None) -> dict[str, str] | None:
    """The weights a ControlNet's detector runs with by role (the defaults filled in, as
    job.json records them); None for detectors that load no models."""
    return detector_models(detector, overrides) if detector in MODEL_DETECTORS else None


# --------------------------------------------------------------------------- running


def _pil(image: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(image))


def person_boxes(models: Any, images: list[np.ndarray]) -> list[np.ndarray]:
    """RT-DETR person boxes of each image as COCO (x, y, width, height) pixels, (n, 4)."""
    import torch

    processor = models.detector_processor
    inputs = processor(images=[_pil(i) for i in images], return_tensors="pt")
    pixels = inputs["pixel_values"].to(models.device, models.dtype)
    with torch.no_grad():
        outputs = models.detector(pixel_values=pixels)
    outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
    sizes = torch.tensor([i.shape[:2] for i in images])
    results = processor.post_process_object_detection(
        outputs, target_sizes=sizes, threshold=PERSON_THRESHOLD
    )
    boxes = []
    for result in results:
        xyxy = result["boxes"][result["labels"] == models.person_label].cpu().numpy()
        xywh = xyxy.copy()
        xywh[:, 2:] = xyxy[:, 2:] - xyxy[:, :2]  # (n, 4) corners -> corner and size
        boxes.append(xywh.astype(np.float32))
    return boxes


def detect_poses(models: Any, images: list[np.ndarray]) -> list[list[tuple]]:
    """Per image, (keypoints (17, 2) pixels, scores (17,)) of every person found."""
    import torch

    boxes = person_boxes(models, images)
    found = [i for i, b in enumerate(boxes) if len(b)]
    poses: list[list[tuple]] = [[] for _ in images]
    if not found:
        return poses
    processor = models.pose_processor
    chosen = [boxes[i] for i in found]
    inputs = processor([_pil(images[i]) for i in found], boxes=chosen, return_tensors="pt")
    pixels = inputs["pixel_values"].to(models.device, models.dtype)  # (people, 3, h, w)
    with torch.no_grad():
        outputs = models.pose(pixel_values=pixels)
    outputs.heatmaps = outputs.heatmaps.float()
    results = processor.post_process_pose_estimation(outputs, boxes=chosen)
    for i, people in zip(found, results, strict=True):
        poses[i] = [(p["keypoints"].cpu().numpy(), p["scores"].cpu().numpy()) for p in people]
    return poses


def estimate_depth(models: Any, images: list[np.ndarray]) -> list[np.ndarray]:
    """Relative inverse depth (H, W) of each image, at the image's size."""
    shapes = {i.shape for i in images}
    if len(shapes) > 1:  # the processor keeps each aspect: one batch per size
        by_shape = {s: estimate_depth(models, [i for i in images if i.shape == s]) for s in shapes}
        return [by_shape[i.shape].pop(0) for i in images]
    return _estimate_depth(models, images)


def _estimate_depth(models: Any, images: list[np.ndarray]) -> list[np.ndarray]:
    """``estimate_depth`` of images of one size, in one batch."""
    import torch

    inputs = models.processor(images=[_pil(i) for i in images], return_tensors="pt")
    pixels = inputs["pixel_values"].to(models.device, models.dtype)
    with torch.no_grad():
        predicted = models.model(pixel_values=pixels).predicted_depth.float()  # (n, h', w')
    out = []
    for depth, image in zip(predicted, images, strict=True):
        resized = torch.nn.functional.interpolate(
            depth[None, None], size=image.shape[:2], mode="bicubic", align_corners=False
        )  # (1, 1, H, W)
        out.append(resized[0, 0].cpu().numpy())
    return out


# --------------------------------------------------------------------------- output cache


class OutputCache:
    """Detector outputs by (detector, weights, size, frame digest), each with the warning it
    gave (None: none), least recently used dropped past ``max_bytes``; ``hits`` and
    ``misses`` count lookups (for tests and logs)."""

    def __init__(self, max_bytes: int = OUTPUT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.items: OrderedDict[tuple, tuple[np.ndarray, str | None]] = OrderedDict()
        self.size = 0
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: tuple) -> tuple[np.ndarray, str | None] | None:
        """The cached (output, warning) for ``key``, or None."""
        with self.lock:
            found = self.items.get(key)
            if found is None:
                self.misses += 1
                return None
            self.items.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: tuple, image: np.ndarray, warning: str | None = None) -> None:
        """Keep ``image`` (read-only) and the warning it gave under ``key``."""
        image = image.copy()
        image.flags.writeable = False
        with self.lock:
            if key in self.items:
                return
            self.items[key] = (image, warning)
            self.size += image.nbytes
            while self.size > self.max_bytes and self.items:
                self.size -= self.items.popitem(last=False)[1][0].nbytes

    def clear(self) -> None:
        """Forget every output."""
        with self.lock:
            self.items.clear()
            self.size = 0


OUTPUTS = OutputCache()


def frame_digest(image: np.ndarray) -> str:
    """A digest of a frame's pixels and shape: the same source frame at the same size."""
    digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16)
    digest.update(repr(image.shape).encode())
    return digest.hexdigest()


class DetectionCancelled(Exception):
    """The job was cancelled while its control frames were being detected."""


@dataclass
class DetectorRun:
    """What a job's detectors run with: loaded models (from the worker's cache), device and
    downloads; warns once per job when a frame shows nobody."""

    # (detector, its weights by role) -> loaded models; None: load without caching, on CPU.
    load: Callable[[str, dict[str, str]], Any] | None = None
    outputs: OutputCache = field(default_factory=lambda: OUTPUTS)
    batch: int = DETECT_BATCH
    warned: set[str] = field(default_factory=set)
    # Asked before each batch: True stops the run with DetectionCancelled.
    should_cancel: Callable[[], bool] | None = None
    # Told after each batch how many frames this run has put through a model so far.
    progress: Callable[[int], None] | None = None
    detected: int = 0

    def models(self, detector: str, weights: dict[str, str]) -> Any:
        """The loaded models of ``detector`` with ``weights``."""
        if self.load is not None:
            return self.load(detector, weights)
        import torch

        from ..models.detectors import load_detector

        return load_detector(detector, weights, torch.device("cpu"))

    def __call__(
        self, detector: str, overrides: dict[str, str] | None, images: list[np.ndarray]
    ) -> list[np.ndarray]:
        """Control images of ``images`` (RGB uint8, each its own size) by model detector
        ``detector``; cached outputs are not computed again."""
        weights = detector_models(detector, overrides)
        tag = (detector, tuple(sorted(weights.items())))
        keys = [(*tag, i.shape, frame_digest(i)) for i in images]
        results = [self.outputs.get(k) for k in keys]
        todo = [i for i, r in enumerate(results) if r is None]
        if todo:
            models = self.models(detector, weights)
        for start in range(0, len(todo), self.batch):
            if self.should_cancel is not None and self.should_cancel():
                raise DetectionCancelled()
            part = todo[start : start + self.batch]
            outs = self._run(detector, models, [images[i] for i in part])
            for i, (out, warning) in zip(part, outs, strict=True):
                self.outputs.put(keys[i], out, warning)
                results[i] = (out, warning)
            self.detected += len(part)
            if self.progress is not None:
                self.progress(self.detected)
        for _, warning in results:
            if warning is not None:
                self.warn_once(warning)
        return [np.array(r[0]) for r in results]

    def _run(
        self, detector: str, models: Any, images: list[np.ndarray]
    ) -> list[tuple[np.ndarray, str | None]]:
        """One batch through the models: each output with its warning (None: none)."""
        if detector == "depth":
            sign = 1.0 if getattr(models, "near_is_larger", True) else -1.0  # metric: far is larger
            return [(depth_to_image(sign * d), None) for d in estimate_depth(models, images)]
        out = []
        for image, poses in zip(images, detect_poses(models, images), strict=True):
            height, width = image.shape[:2]
            people = openpose_people(poses, width, height)
            out.append((draw_openpose(people, width, height), None if people else NOBODY))
        return out

    def warn_once(self, text: str) -> None:
        """Log ``text`` the first time it comes up in this run (this job)."""
        if text not in self.warned:
            self.warned.add(text)
            log.warning(text)
