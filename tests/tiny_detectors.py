"""Tiny random-weight detector models (RT-DETR, VitPose, Depth Anything) for the tests.

Each is saved with save_pretrained (safetensors) together with its PIL image processor's
preprocessor_config.json: the files of the real hub repos, in miniature (~0.3 MB each).
``sees`` sets the RT-DETR class biases so that every query finds a person ("everyone",
score ~1) or none does ("nobody", score ~5e-5), whatever the image. torch and transformers
are imported only when a model is built. Run as a script to build them into a folder:
``python tests/tiny_detectors.py FOLDER``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# RT-DETR classes of the tiny detector: "person" is not id 0, so a detector that took
# class 0 for people would be caught.
LABELS = {0: "car", 1: "person"}
# Queries of the tiny RT-DETR: the most people it can find in one frame.
QUERIES = 6


def build_person_detector(folder: Path, sees: str = "everyone", seed: int = 0) -> Path:
    """A tiny RT-DETR whose every query scores ``sees`` ("everyone"/"nobody") as a person."""
    import torch
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

    from backend.models.detectors import pil_processor

    torch.manual_seed(seed)
    backbone = RTDetrResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 8, 16, 16],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    config = RTDetrConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        encoder_hidden_dim=16,
        encoder_in_channels=[8, 16, 16],
        d_model=16,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        decoder_in_channels=[16, 16, 16],
        num_feature_levels=3,
        decoder_n_points=2,
        num_queries=QUERIES,
        num_denoising=0,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    model = RTDetrForObjectDetection(config)
    person = 10.0 if sees == "everyone" else -10.0
    with torch.no_grad():
        for head in model.model.decoder.class_embed:
            head.weight.zero_()
            head.bias.copy_(torch.tensor([-10.0, person]))
    model.save_pretrained(folder)
    pil_processor("RTDetrImageProcessor")(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def build_pose_estimator(folder: Path, seed: int = 0) -> Path:
    """A tiny VitPose (COCO's 17 keypoints) with random weights."""
    import torch
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation

    from backend.models.detectors import pil_processor

    torch.manual_seed(seed)
    backbone = VitPoseBackboneConfig(
        image_size=[64, 48],
        patch_size=[16, 16],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        out_indices=[2],
    )
    config = VitPoseConfig(backbone_config=backbone, num_labels=17)  # COCO keypoints
    VitPoseForPoseEstimation(config).save_pretrained(folder)
    pil_processor("VitPoseImageProcessor")(size={"height": 64, "width": 48}).save_pretrained(folder)
    return folder


def build_depth_estimator(folder: Path, seed: int = 0) -> Path:
    """A tiny Depth Anything (DINOv2 backbone) with random weights."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    from backend.models.detectors import pil_processor

    torch.manual_seed(seed)
    backbone = Dinov2Config(
        image_size=28,
        patch_size=14,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=16,
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
        patch_size=14,
    )
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    processor = pil_processor("DPTImageProcessor")(
        size={"height": 28, "width": 28}, keep_aspect_ratio=True, ensure_multiple_of=14
    )
    processor.save_pretrained(folder)
    return folder


def build_all(root: Path) -> dict[str, Path]:
    """Every tiny detector model in ``root``: person, nobody, pose, depth."""
    root.mkdir(parents=True, exist_ok=True)
    return {
        "person": build_person_detector(root / "person"),
        "nobody": build_person_detector(root / "nobody", sees="nobody"),
        "pose": build_pose_estimator(root / "pose"),
        "depth": build_depth_estimator(root / "depth"),
    }


def repo_files(folder: Path) -> dict[str, bytes]:
    """A model folder as a FakeHub repo ({path: bytes})."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    for name, path in build_all(Path(sys.argv[1])).items():
        print(name, path)
