"""Flow-guided consistency: backend/engine/flow.py (warp, visibility, fusion),
backend/media/flow.py (DIS estimation, motion-vector files) and the engine's "flow" option."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.engine.flow import (
    FlowFusion,
    FrameFusion,
    fuse,
    fuse_sequence,
    inside,
    resize_flow,
    visibility,
    warp,
)
from backend.engine.pipeline import ControlInput, TextToVideoZero, plan_generation
from backend.media.flow import (
    EstimatedFlows,
    FileFlows,
    FlowError,
    estimate_flow,
    latent_flow,
)
from backend.media.video_io import write_png
from backend.models.loading import ModelCache
from backend.protocol import JobError, validate_job
from backend.service.cli import build_parser, job_from_args
from backend.service.runner import run_job

FRAMES, SIZE, STEPS = 4, 64, 4
LATENT = SIZE // 8


def pattern(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A smooth analytic image, so a bilinear sample of it is close to its exact value."""
    return torch.sin(x / 5.0) + torch.cos(y / 7.0) + 0.5 * torch.sin((x + y) / 9.0)


def grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return xs, ys


def constant_flow(dx: float, dy: float, h: int, w: int, n: int = 1) -> torch.Tensor:
    return torch.tensor([dx, dy]).view(1, 2, 1, 1).expand(n, 2, h, w).clone()


# --------------------------------------------------------------------------- warp


@pytest.mark.parametrize(("dx", "dy"), [(1.25, -0.5), (-3.7, 2.2), (0.5, 0.5)])
def test_warp_samples_the_image_at_p_plus_flow_with_fractional_shifts(dx: float, dy: float):
    h, w = 64, 96  # a real latent size (512x768 pixels), not square
    xs, ys = grid(h, w)
    image = pattern(xs, ys)[None, None]  # (1, 1, h, w)
    out = warp(image, constant_flow(dx, dy, h, w))[0, 0]
    expected = pattern(xs + dx, ys + dy)
    interior = (slice(5, -5), slice(5, -5))
    # Bilinear error of this smooth pattern: second derivative / 8 < 0.01.
    assert (out - expected)[interior].abs().max() < 0.01
    # The other direction is far off: the warp's sign matters.
    assert (warp(image, constant_flow(-dx, -dy, h, w))[0, 0] - expected)[interior].abs().max() > 0.1


def test_warp_by_an_integer_shift_moves_pixels_exactly():
    image = torch.rand(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    out = warp(image, constant_flow(2.0, 1.0, 8, 12, n=2))
    torch.testing.assert_close(out[..., :-1, :-2], image[..., 1:, 2:])


def test_inside_marks_where_the_flow_leaves_the_frame():
    m = inside(constant_flow(3.0, 0.0, 4, 10))[0, 0]
    assert m[:, :7].all() and not m[:, 7:].any()


def test_resize_flow_rescales_vectors_to_the_new_grid():
    flow = constant_flow(8.0, -4.0, 64, 96)
    small = resize_flow(flow, (8, 12))
    assert small.shape == (1, 2, 8, 12)
    torch.testing.assert_close(small[0, :, 0, 0], torch.tensor([1.0, -0.5]))


# --------------------------------------------------------------------------- occlusion


def moving_square(step: int, h: int = 32, w: int = 32) -> tuple:
    """Frames k - 1 and k of a 8x8 square moving ``step`` px right over a static background,
    with their exact backward (k -> k - 1) and forward (k - 1 -> k) flows."""
    before = torch.zeros(h, w, dtype=torch.bool)
    before[12:20, 8:16] = True
    now = torch.roll(before, step, dims=1)
    backward = torch.zeros(1, 2, h, w)
    backward[0, 0][now] = -step
    forward = torch.zeros(1, 2, h, w)
    forward[0, 0][before] = step
    return before, now, backward, forward


def test_visibility_hides_exactly_what_the_square_uncovered():
    before, now, backward, forward = moving_square(4)
    seen = visibility(backward, forward)[0, 0].bool()
    uncovered = before & ~now  # background at k that the square covered at k - 1
    assert uncovered.sum() == 32
    assert torch.equal(seen, ~uncovered)


def test_visibility_of_a_still_frame_is_everywhere_and_of_wrong_flows_nowhere_moving():
    zero = torch.zeros(1, 2, 16, 16)
    assert visibility(zero, zero).all()
    _, now, backward, forward = moving_square(4)
    # Forward flow given with the wrong sign: the moving square's pixels do not come back.
    assert not visibility(backward, -forward)[0, 0][now].any()


def test_visibility_rejects_mismatched_flows():
    with pytest.raises(ValueError, match="differ in shape"):
        visibility(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 9))
    with pytest.raises(ValueError, match="frames, 2, height, width"):
        warp(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


# --------------------------------------------------------------------------- fusion


def test_fuse_takes_the_warped_previous_where_visible_and_keeps_the_rest():
    x0 = torch.zeros(1, 4, 8, 8)
    previous = torch.arange(64.0).view(1, 1, 8, 8).expand(1, 4, 8, 8)
    flow = constant_flow(1.0, 0.0, 8, 8)
    visible = torch.zeros(1, 1, 8, 8)
    visible[..., :4] = 1
    out = fuse(x0, previous, flow, visible, strength=1.0)
    torch.testing.assert_close(out[..., :4], previous[..., 1:5])
    assert (out[..., 4:] == 0).all()
    half = fuse(x0, previous, flow, visible, strength=0.5)
    torch.testing.assert_close(half[..., :4], previous[..., 1:5] / 2)


def test_fuse_sequence_chains_each_frame_to_the_fused_one_before_it():
    x0 = torch.rand(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    flows = torch.zeros(2, 3, 8, 8)
    flows[:, 2] = 1  # still and visible everywhere: every frame becomes frame 1
    out = fuse_sequence(x0, None, flows)
    assert torch.equal(out[0], x0[0]) and torch.equal(out[2], x0[0])
    carried = torch.ones(1, 4, 8, 8)
    out = fuse_sequence(x0[1:], carried, flows)
    assert torch.equal(out, carried.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="need 2 flows"):
        fuse_sequence(x0, None, torch.zeros(3, 3, 8, 8))


def test_frame_fusion_pulls_decoded_frames_along_the_flow_whatever_the_slices():
    """The final pixel-space fusion: frame 1 as decoded, frame k halfway to the fused frame
    k - 1 moved by the flow where visible; slices of 1, 2 or 4 frames give the same bytes."""
    images = torch.randint(0, 256, (4, 8, 8, 3), generator=torch.Generator().manual_seed(3))
    images = images.to(torch.uint8)
    flows = {
        k: torch.cat([constant_flow(1.0, 0.0, 8, 8)[0], torch.ones(1, 8, 8)]) for k in (1, 2, 3)
    }
    flows[2][2, :, 4:] = 0  # the right half of frame 3 hidden in frame 2

    def fused(slice_size: int) -> torch.Tensor:
        fusion = FrameFusion(flows.__getitem__, 0.5)
        parts = [
            fusion(range(s, min(s + slice_size, 4)), images[s : s + slice_size])
            for s in range(0, 4, slice_size)
        ]
        return torch.cat(parts)

    whole = fused(4)
    assert torch.equal(whole[0], images[0])
    # Frame 2 at column 2 (a whole-pixel flow of 1: frame 1's column 3), halfway.
    expected = (images[1, :, 2].float() + images[0, :, 3].float()) / 2
    torch.testing.assert_close(whole[1, :, 2].float(), expected, atol=0.5, rtol=0)
    assert torch.equal(whole[2, :, 4:], images[2, :, 4:])  # hidden: kept as decoded
    assert torch.equal(fused(1), whole) and torch.equal(fused(2), whole)
    with pytest.raises(ValueError, match="in order from 0, got \\[1, 2\\]"):
        FrameFusion(flows.__getitem__, 0.5)([1, 2], images[1:3])


def test_flow_fusion_window_is_a_fraction_of_the_joint_steps():
    window = FlowFusion(start=0.25, end=0.75)
    assert [window.active(i, 2, 10) for i in range(2, 10)] == [False] * 2 + [True] * 4 + [False] * 2


# --------------------------------------------------------------------------- estimation


def textured(n: int = 400, seed: int = 0) -> np.ndarray:
    """A smooth random grey texture (n x n), float in [0, 1]."""
    small = np.random.default_rng(seed).random((n // 10, n // 10)).astype(np.float32)
    return cv2.resize(small, (n, n), interpolation=cv2.INTER_CUBIC)


def view(texture: np.ndarray, dx: float, dy: float, size: int = 128) -> np.ndarray:
    """(size, size, 3) uint8 crop of the texture with its content moved by (dx, dy) px."""
    moved = cv2.warpAffine(
        texture, np.float32([[1, 0, dx], [0, 1, dy]]), texture.shape[::-1], flags=cv2.INTER_CUBIC
    )
    crop = moved[100 : 100 + size, 100 : 100 + size]
    return np.repeat((np.clip(crop, 0, 1) * 255).round().astype(np.uint8)[..., None], 3, axis=2)


@pytest.mark.parametrize(("dx", "dy"), [(3.4, -2.3), (-1.5, 0.75)])
def test_dis_recovers_a_known_translation_within_half_a_pixel(dx: float, dy: float):
    texture = textured()
    a, b = view(texture, 0, 0), view(texture, dx, dy)
    flow = estimate_flow(a, b)  # a at p matches b at p + flow: the content's motion
    inner = flow[16:-16, 16:-16]
    assert abs(np.median(inner[..., 0]) - dx) < 0.5
    assert abs(np.median(inner[..., 1]) - dy) < 0.5
    back = estimate_flow(b, a)
    assert abs(np.median(back[16:-16, 16:-16, 0]) + dx) < 0.5


def test_estimated_latent_flows_carry_the_motion_to_the_latent_grid():
    texture = textured(seed=3)
    video = {k: view(texture, 4.0 * k, 0.0) for k in range(3)}  # 4 px right a frame
    flows = EstimatedFlows(video, range(3), (16, 16))
    assert list(flows) == [1, 2] and 0 not in flows
    f = flows[2]
    assert f.shape == (3, 16, 16)
    # Backward: frame k's content was 4 px left in k - 1, i.e. -0.5 latent px at 1/8.
    assert abs(f[0, 4:-4, 4:-4].median().item() + 0.5) < 0.0625
    assert abs(f[1, 4:-4, 4:-4].median().item()) < 0.0625
    # The left column's content came in from outside the frame: not visible in frame k - 1.
    assert f[2, :, 0].sum() == 0 and f[2, 4:-4, 4:-4].all()


def test_file_flows_read_npy_frames_in_name_order(tmp_path):
    h, w = 32, 48
    for k in range(3):
        vectors = np.zeros((h, w, 4), np.float32)
        vectors[..., 0] = -2.0 * k  # to the previous frame: content came from the left...
        vectors[..., 2] = 2.0 * (k + 1)  # ...and goes on right to the next
        np.save(tmp_path / f"frame_{k + 1:05d}.npy", vectors)
    (tmp_path / "notes.txt").write_text("not a frame")
    flows = FileFlows(tmp_path, range(3), (8, 12), (64, 96))  # vectors rescaled to 64x96 first
    f = flows[1]
    torch.testing.assert_close(f[0], torch.full((8, 12), -0.5))  # -2 px * 2 / 8
    assert f[2, :, 1:].all() and not f[2, :, 0].any()


def test_file_flows_refuse_missing_and_malformed_frames(tmp_path):
    with pytest.raises(FlowError, match="not a folder"):
        FileFlows(tmp_path / "nope", range(2), (4, 4), (32, 32))
    np.save(tmp_path / "a.npy", np.zeros((8, 8, 3), np.float32))
    with pytest.raises(FlowError, match="holds 1 .npy frames, the job needs 2"):
        FileFlows(tmp_path, range(2), (4, 4), (32, 32))
    np.save(tmp_path / "b.npy", np.zeros((8, 8, 3), np.float32))
    with pytest.raises(FlowError, match=r"b\.npy must hold \(height, width, 2 or 4\)"):
        FileFlows(tmp_path, range(2), (4, 4), (32, 32))[1]


def test_latent_flow_without_a_forward_flow_sees_all_but_the_edges():
    backward = np.zeros((64, 64, 2), np.float32)
    backward[..., 1] = 16.0  # content came from 16 px below: the bottom quarter was outside
    f = latent_flow(backward, None, (8, 8))
    assert f[2, :6].all() and not f[2, 6:].any()
    assert math.isclose(f[1].mean().item(), 2.0)


# --------------------------------------------------------------------------- engine


# Fusion at every step: the default window (the last fifth of the steps) holds no step of
# these 4-step runs, so a test of the default would not be testing the fusion.
# Latent fusion alone (pixel-aware fusion needs a flow's pixels(k), which these dicts lack;
# its own tests below).
EVERY_STEP = FlowFusion(start=0.0, end=1.0, strength=1.0, pixel_aware=0.0)


def run(engine: TextToVideoZero, **kwargs: Any) -> torch.Tensor:
    if "flow" in kwargs:
        kwargs.setdefault("flow_fusion", EVERY_STEP)
    params = dict(
        prompt="a cat",
        num_frames=FRAMES,
        height=SIZE,
        width=SIZE,
        seed=0,
        num_inference_steps=STEPS,
        motion_dynamics=False,
    )
    params.update(kwargs)
    return engine(**params)


def still_flows(visible: float = 1.0, dx: float = 0.0) -> dict[int, torch.Tensor]:
    flows = {}
    for k in range(1, FRAMES):
        f = torch.zeros(3, LATENT, LATENT)
        f[0], f[2] = dx, visible
        flows[k] = f
    return flows


@pytest.fixture(scope="module")
def p2p(tiny_pix2pix: Any) -> TextToVideoZero:
    return TextToVideoZero(tiny_pix2pix)


@pytest.fixture(scope="module")
def moving_source() -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {k: torch.rand(3, SIZE, SIZE, generator=gen) for k in range(FRAMES)}


def test_flow_with_nothing_visible_is_the_paper_bit_for_bit(p2p, moving_source) -> None:
    paper = run(p2p, image=moving_source)
    hidden = run(p2p, image=moving_source, consistency="flow", flow=still_flows(visible=0.0))
    assert torch.equal(paper, hidden)


def test_flow_ties_frames_along_the_flow(p2p, moving_source) -> None:
    paper = run(p2p, image=moving_source)
    fused = run(
        p2p,
        image=moving_source,
        consistency="flow",
        flow=still_flows(),
    )
    # Still and visible everywhere, fused at every step: frames come out as frame 1 (the
    # last step's x0 is frame 1's; only each frame's own noise estimate, weighted by
    # sqrt(1 - alphas_cumprod[0]) ~ 0.03, is left), while the paper's follow their sources.
    for k in range(1, FRAMES):
        assert (fused[k] - fused[0]).abs().max() < 0.01
        assert (paper[k] - paper[0]).abs().max() > 0.1
    torch.testing.assert_close(fused[0], paper[0])  # frame 1 has no predecessor


@pytest.mark.parametrize(("chunk_size", "frame_ids"), [(1, None), (3, None), (2, [2, 3]), (1, [3])])
def test_flow_results_do_not_depend_on_chunks_or_frame_ranges(
    p2p, moving_source, chunk_size: int, frame_ids: list[int] | None
) -> None:
    kwargs = dict(image=moving_source, consistency="flow", flow=still_flows(0.7, 0.4))
    full = run(p2p, chunk_size=FRAMES, **kwargs)
    part = run(p2p, chunk_size=chunk_size, frame_ids=frame_ids, **kwargs)
    expected = full if frame_ids is None else full[frame_ids]
    torch.testing.assert_close(part, expected, rtol=1e-5, atol=1e-4)


class StillPixelFlows(dict):
    """still_flows with the full-resolution flow pixel-aware fusion needs (media/flow.py)."""

    def pixels(self, frame: int) -> torch.Tensor:
        small = self[frame]  # (3, LATENT, LATENT): flow in latent pixels, visibility
        full = F.interpolate(small[None], size=(SIZE, SIZE), mode="nearest")[0]
        return torch.cat([full[:2] * (SIZE // LATENT), full[2:]])  # (3, SIZE, SIZE)


PIXEL_AWARE = FlowFusion(start=0.0, end=1.0, strength=0.5, pixel_aware=0.5)
RELATIVE = FlowFusion(start=0.0, end=1.0, strength=0.5, pixel_aware=0.5, pixel_aware_relative=True)


@pytest.mark.parametrize(
    ("chunk_size", "frame_ids", "fusion"),
    [(1, None, PIXEL_AWARE), (3, None, RELATIVE), (2, [2, 3], RELATIVE), (1, [3], PIXEL_AWARE)],
)
def test_pixel_aware_fusion_does_not_depend_on_chunks_or_frame_ranges(
    p2p, moving_source, chunk_size: int, frame_ids: list[int] | None, fusion: FlowFusion
) -> None:
    flow = StillPixelFlows(still_flows(1.0, 0.4))
    kwargs = dict(image=moving_source, consistency="flow", flow=flow, flow_fusion=fusion)
    full = run(p2p, chunk_size=FRAMES, **kwargs)
    part = run(p2p, chunk_size=chunk_size, frame_ids=frame_ids, **kwargs)
    expected = full if frame_ids is None else full[frame_ids]
    torch.testing.assert_close(part, expected, rtol=1e-5, atol=1e-4)
    latent_only = FlowFusion(0.0, 1.0, 0.5, pixel_aware=0.0)
    latent = run(p2p, chunk_size=FRAMES, **{**kwargs, "flow_fusion": latent_only})
    torch.testing.assert_close(full[0], latent[0])  # frame 1 has no predecessor
    assert all((full[k] - latent[k]).abs().max() > 1e-3 for k in range(1, FRAMES))


def test_pixel_aware_fusion_needs_the_full_resolution_flow(p2p, moving_source) -> None:
    with pytest.raises(ValueError, match=r"pixel-aware flow fusion .* needs a flow with pixels"):
        run(
            p2p,
            image=moving_source,
            consistency="flow",
            flow=still_flows(),
            flow_fusion=PIXEL_AWARE,
        )


def test_flow_frame_ranges_compute_every_frame_before_them() -> None:
    plan = plan_generation([5, 6], chunk_size=3, steps=4, motion_phase=False, sequential=True)
    assert plan.processed == list(range(7))
    assert plan.chunks == [[0, 1, 2], [3, 4, 5], [6]]
    assert plan_generation([5, 6], 3, 4, False).processed == [0, 5, 6]


def test_flow_consistency_checks_its_inputs(p2p, moving_source, tiny_controlnet) -> None:
    with pytest.raises(ValueError, match="consistency must be one of paper, flow"):
        run(p2p, image=moving_source, consistency="rerender")
    with pytest.raises(ValueError, match='"flow" needs flow'):
        run(p2p, image=moving_source, consistency="flow")
    with pytest.raises(ValueError, match="used only with consistency"):
        run(p2p, image=moving_source, flow=still_flows())
    missing = still_flows()
    del missing[2]
    with pytest.raises(ValueError, match=r"no entry for frames \[2\]"):
        run(p2p, image=moving_source, consistency="flow", flow=missing)
    wrong = {k: torch.zeros(2, LATENT, LATENT) for k in range(1, FRAMES)}
    with pytest.raises(ValueError, match=r"flow\[1\] must be \(3, 8, 8\)"):
        run(p2p, image=moving_source, consistency="flow", flow=wrong)


def test_controlnet_flow_runs_and_differs_from_paper(tiny_base, tiny_controlnet) -> None:
    engine = TextToVideoZero(tiny_base, [tiny_controlnet])
    gen = torch.Generator().manual_seed(9)
    images = {k: torch.rand(3, SIZE, SIZE, generator=gen) for k in range(FRAMES)}
    controls = [ControlInput(tiny_controlnet, images, 1.0)]
    paper = run(engine, controls=controls)
    flow = run(engine, controls=controls, consistency="flow", flow=still_flows(1.0, 0.5))
    torch.testing.assert_close(flow[0], paper[0])
    assert all((flow[k] - paper[k]).abs().max() > 1e-2 for k in range(1, FRAMES))


# --------------------------------------------------------------------------- job, CLI, runner


def job_fields(out: Path, **fields: Any) -> dict[str, Any]:
    return {
        "prompt": "make it snow",
        "out": str(out),
        "mode": "pix2pix",
        "model": "builtin:tiny-pix2pix",
        "frames": 4,
        "width": 64,
        "height": 64,
        "steps": 3,
        "device": "cpu",
        "dtype": "float32",
        "write_mp4": False,
        "save_latents": True,
        **fields,
    }


def test_consistency_is_validated_naming_the_field(tmp_path: Path) -> None:
    video = {"path": str(tmp_path)}
    job = validate_job(job_fields(tmp_path / "o", video=video))
    assert job.consistency == "paper" and job.to_dict()["consistency"] == "paper"
    with pytest.raises(JobError, match=r"^consistency: .*'rerender'"):
        validate_job(job_fields(tmp_path / "o", video=video, consistency="rerender"))
    with pytest.raises(JobError, match="^consistency: .*controlnet or pix2pix"):
        validate_job({"prompt": "a cat", "out": "o", "consistency": "flow"})
    with pytest.raises(JobError, match='^flow_source: applies only with consistency "flow"'):
        validate_job(job_fields(tmp_path / "o", video=video, flow_source="estimate"))
    keypoints = {"model": "m", "control": {"path": "pose.json"}}
    with pytest.raises(JobError, match="^flow_source: OpenPose keypoint files"):
        validate_job(
            {"prompt": "p", "out": "o", "mode": "controlnet", "controlnets": [keypoints],
             "consistency": "flow"}
        )  # fmt: skip
    folder = {"prompt": "p", "out": "o", "mode": "controlnet", "controlnets": [keypoints]}
    flows = validate_job({**folder, "consistency": "flow", "flow_source": "vectors"})
    assert flows.to_dict()["flow_source"] == "vectors"


def test_cli_flags_fill_consistency_and_flow_source() -> None:
    args = build_parser().parse_args(
        ["generate", "--prompt", "p", "--out", "o", "--mode", "pix2pix", "--video", "v",
         "--consistency", "flow", "--flow-source", "estimate"]
    )  # fmt: skip
    job = job_from_args(args)
    assert job["consistency"] == "flow" and job["flow_source"] == "estimate"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--consistency", "rerender"])


def square_video(folder: Path, frames: int) -> Path:
    """A white square moving 4 px right a frame over a textured background, 64x64 PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    texture = (textured(200, seed=2)[:64, :64] * 120).astype(np.uint8)
    for i in range(frames):
        image = np.repeat(texture[..., None], 3, axis=2)
        image[20:44, 8 + 4 * i : 32 + 4 * i] = 255
        write_png(folder / f"v{i:02d}.png", image)
    return folder


@pytest.fixture(scope="module")
def job_cache(tiny_models: dict) -> ModelCache:
    return ModelCache(max_bases=2)


def test_flow_job_is_exact_over_frame_ranges_and_recorded(tmp_path: Path, job_cache) -> None:
    video = str(square_video(tmp_path / "video", 4))
    flow = {"video": video, "consistency": "flow"}
    run_job(validate_job(job_fields(tmp_path / "paper", video=video)), job_cache)
    run_job(validate_job(job_fields(tmp_path / "full", **flow)), job_cache)
    run_job(
        validate_job(job_fields(tmp_path / "part", frame_range=[3, 4], chunk_size=1, **flow)),
        job_cache,
    )
    full, part = np.load(tmp_path / "full/latents.npy"), np.load(tmp_path / "part/latents.npy")
    paper = np.load(tmp_path / "paper/latents.npy")
    np.testing.assert_allclose(part, full[2:], rtol=1e-5, atol=1e-4)
    assert sorted(p.name for p in (tmp_path / "part").glob("*.png")) == [
        "frame_00003.png",
        "frame_00004.png",
    ]
    # The pixel-space fusion carries frames 1-2 into frame 3 although they are not written.
    for name in ("frame_00003.png", "frame_00004.png"):
        part_png, full_png = (cv2.imread(str(tmp_path / d / name)) for d in ("part", "full"))
        assert np.abs(part_png.astype(int) - full_png.astype(int)).max() <= 1
    np.testing.assert_array_equal(full[0], paper[0])  # frame 1 has no predecessor
    assert np.abs(full[1:] - paper[1:]).max() > 1e-2
    saved = json.loads((tmp_path / "full/job.json").read_text())
    assert saved["consistency"] == "flow" and saved["flow_source"] is None


def test_flow_job_reads_motion_vector_files(tmp_path: Path, job_cache) -> None:
    video = str(square_video(tmp_path / "video", 3))
    vectors = tmp_path / "vectors"
    vectors.mkdir()
    for k in range(3):
        np.save(vectors / f"{k:04d}.npy", np.zeros((32, 32, 2), np.float32))
    fields = {"video": video, "consistency": "flow", "frames": 3}
    run_job(validate_job(job_fields(tmp_path / "est", **fields)), job_cache)
    run_job(
        validate_job(job_fields(tmp_path / "npy", flow_source=str(vectors), **fields)), job_cache
    )
    # Zero motion from the files differs from the square's estimated motion.
    assert (
        np.abs(np.load(tmp_path / "est/latents.npy") - np.load(tmp_path / "npy/latents.npy")).max()
        > 1e-3
    )
    (vectors / "0002.npy").unlink()
    with pytest.raises(FlowError, match="holds 2 .npy frames, the job needs 3"):
        run_job(
            validate_job(job_fields(tmp_path / "bad", flow_source=str(vectors), **fields)),
            job_cache,
        )
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- pictures


@pytest.fixture(scope="module")
def shapes_controlnet(_single_threaded_torch: None) -> TextToVideoZero:
    """The trained shapes ControlNet on the shapes base model (as bench.quality loads it)."""
    from backend.models.loading import load_base_model, load_controlnet

    base = load_base_model("builtin:shapes", dtype=torch.float32)
    return TextToVideoZero(
        base, [load_controlnet("builtin:shapes-controlnet", dtype=torch.float32)]
    )


def test_flow_lowers_the_warp_error_of_pictures_and_only_the_right_way_round(
    shapes_controlnet: TextToVideoZero,
) -> None:
    """Decoded ControlNet videos of a moving shape (bench.quality's flow section, seeds
    0-1): warp error (Delta E against the true motion) of the paper, of flow estimated from
    the frames, of the true motion reversed, and of the estimate fused in the loop alone
    (latent and pixel-aware, no final pixel-space fusion). Measured with the default
    FlowFusion (latent 0.25 + pixel-aware 0.25 + pixel 0.6): 5.95, 1.88 (0.32x the
    paper's), 2.10 (flow is 0.90x the reversed one's) and 2.51 (the pixel-space fusion
    takes off a quarter: 0.75x). Ignoring the flow gives the paper's figure; applying it the
    wrong way round swaps the second and third; dropping the pixel-space fusion the second
    and fourth."""
    from bench import quality

    settings = quality.Settings(seeds=2)
    configs = ("paper", "flow, estimated", "flow, reversed")
    per_seed, _ = quality.flow_mode("controlnet", shapes_controlnet, settings, configs)
    latent, _ = quality.flow_mode(
        "controlnet",
        shapes_controlnet,
        settings,
        ("flow, estimated",),
        fusion=FlowFusion(pixel_strength=0.0),
    )
    paper, flow, reversed_ = (np.mean([s["warp_de"] for s in per_seed[c]]) for c in configs)
    latent_only = np.mean([s["warp_de"] for s in latent["flow, estimated"]])
    assert flow < 0.45 * paper  # measured 0.32x
    assert flow < 0.95 * reversed_  # measured 0.90x
    assert flow < 0.9 * latent_only  # measured 0.75x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pixel_aware_round_trip_runs_on_half_precision_vaes(dtype: torch.dtype) -> None:
    """dtype auto picks bfloat16 on CPUs with native bf16: the pixel-aware VAE round trip
    must run there (it raised a dtype mismatch: float32 input into a bfloat16 VAE), equal
    the float32 model's within bfloat16's rounding, and leave the VAE in its dtype."""
    from backend.models.loading import load_base_model

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    shift = torch.full((1, 2, 64, 64), 1.5)  # every pixel fetched 1.5 px right and down
    reference = TextToVideoZero(load_base_model("builtin:tiny"))._warp_through_vae(latents, shift)
    engine = TextToVideoZero(load_base_model("builtin:tiny", dtype=dtype))
    out = engine._warp_through_vae(latents.to(dtype), shift)
    assert engine.base.vae.dtype == dtype
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    # The weights are the float32 model's rounded to dtype, the round trip runs in float32.
    assert torch.allclose(out, reference, atol=0.1 * reference.abs().max().item())
