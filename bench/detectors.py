"""The detectors' cost per frame at their real sizes, batched against one frame at a time,
and a cached regenerate against the first run, side by side in ONE process.

Random weights in the default models' architectures (no download): Depth Anything V2
Small (DINOv2-S, 518 px), RT-DETR R50 (640 px) and VitPose-B simple (256x192 crops),
through ``backend.media.detectors`` on ``--frames`` random frames at ``--size`` pixels.
Variants of the depth detector: ``batch1`` (one frame per call), ``batchN`` (all frames in
one call, as ``DetectorRun`` does up to DETECT_BATCH) and ``cached`` (a second job over the
same frames: every output from the cache). The pose models are timed per call: RT-DETR on
the frames (random weights find random boxes: VitPose's cost is per person, so it is
timed apart), VitPose on ``--people`` boxes of one frame.

    python -m bench.detectors --frames 4 --size 256 --repeats 2
    python -m bench.detectors --device cuda --frames 8 --size 512 --repeats 5
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from backend.media.detectors import (
    DetectorRun,
    OutputCache,
    depth_to_image,
    estimate_depth,
    person_boxes,
)
from backend.models.detectors import DepthModel, PoseModels, detector_dtype, pil_processor
from bench.measure import cpu_name, device_name, interleaved, warm_up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.detectors", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="frame side in pixels")
    parser.add_argument("--people", type=int, default=2, help="VitPose boxes in one frame")
    parser.add_argument("--repeats", type=int, default=2)
    return parser.parse_args(argv)


def depth_model(device: torch.device) -> DepthModel:
    """Depth Anything V2 Small's architecture with random weights."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        image_size=518,
        patch_size=14,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        out_indices=[3, 6, 9, 12],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=384,
        neck_hidden_sizes=[48, 96, 192, 384],
        fusion_hidden_size=64,
        head_hidden_size=32,
    )
    dtype = detector_dtype(device)
    model = DepthAnythingForDepthEstimation(config).to(device, dtype).eval()
    processor = pil_processor("DPTImageProcessor")(
        size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14
    )
    return DepthModel(model, processor, device, dtype)


def pose_models(device: torch.device) -> PoseModels:
    """RT-DETR R50 and VitPose-B simple architectures with random weights."""
    from transformers import (
        RTDetrConfig,
        RTDetrForObjectDetection,
        VitPoseBackboneConfig,
        VitPoseConfig,
        VitPoseForPoseEstimation,
    )

    dtype = detector_dtype(device)
    detector = RTDetrForObjectDetection(RTDetrConfig(num_labels=80)).to(device, dtype).eval()
    backbone = VitPoseBackboneConfig(out_indices=[12])  # ViT-B, 256x192 crops
    pose = VitPoseForPoseEstimation(
        VitPoseConfig(backbone_config=backbone, use_simple_decoder=True, num_labels=17)
    )
    return PoseModels(
        detector=detector,
        detector_processor=pil_processor("RTDetrImageProcessor")(),
        pose=pose.to(device, dtype).eval(),
        pose_processor=pil_processor("VitPoseImageProcessor")(),
        person_label=0,
        device=device,
        dtype=dtype,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    frames = [
        rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.frames)
    ]
    depth = depth_model(device)
    poses = pose_models(device)
    cache = OutputCache()
    weights = {"depth": "bench"}
    DetectorRun(load=lambda name, models: depth, outputs=cache)("depth", weights, frames)
    side = args.size
    boxes = [[side * 0.1 + 10 * i, side * 0.1, side * 0.3, side * 0.7] for i in range(args.people)]

    def vitpose() -> object:
        processor = poses.pose_processor
        inputs = processor(frames[0], boxes=[np.array(boxes, np.float32)], return_tensors="pt")
        return poses.pose(pixel_values=inputs["pixel_values"].to(device, poses.dtype))

    variants = {
        "depth batch1": lambda: [depth_to_image(estimate_depth(depth, [f])[0]) for f in frames],
        f"depth batch{len(frames)}": lambda: [
            depth_to_image(d) for d in estimate_depth(depth, frames)
        ],
        "depth cached": lambda: DetectorRun(load=None, outputs=cache)("depth", weights, frames),
        "rtdetr (person boxes)": lambda: person_boxes(poses, frames),
        f"vitpose ({args.people} people)": vitpose,
    }
    print(f"machine: {cpu_name()}; device: {device_name(device)}; torch threads: "
          f"{torch.get_num_threads()}; {len(frames)} frames of {side}x{side}")  # fmt: skip
    warm_up(variants, device)
    results = interleaved(variants, args.repeats, device, log=lambda _: None)
    base = results["depth batch1"].median
    for name, measured in results.items():
        per_frame = measured.median / (1 if name.startswith("vitpose") else len(frames))
        print(f"{name:32s} {measured.median:8.3f} s  {per_frame:7.3f} s/frame  "
              f"{base / measured.median:7.2f}x depth batch1")  # fmt: skip
    print(f"cache: {cache.hits} hits, {cache.misses} misses")
    return 0


if __name__ == "__main__":
    sys.exit(main())
