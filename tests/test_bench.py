"""bench/: the floor runs exactly the model evaluations our engine runs (no timing here)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from backend.engine import ControlInput, TextToVideoZero
from backend.protocol import resolve_t0_t1
from bench.workloads import Workload, call_batches

SIZE = 64


@pytest.mark.parametrize(
    ("frames", "steps", "chunk_size"), [(5, 10, 2), (3, 2, 8), (8, 50, 3), (1, 4, 1)]
)
def test_text2video_floor_is_the_issue_formula(frames: int, steps: int, chunk_size: int) -> None:
    """(steps - t1 - 1) + (t1 - t0) + (t1 + 1) * frames frame evaluations."""
    t0, t1 = resolve_t0_t1(steps)
    batches = call_batches(Workload("text2video", frames, SIZE, steps, chunk_size))
    assert sum(batches) == (steps - t1 - 1) + (t1 - t0) + (t1 + 1) * frames
    assert max(batches) == min(chunk_size, frames)


def unet_batches(engine: TextToVideoZero, **kwargs: Any) -> list[int]:
    """Batch sizes of every UNet call the engine makes for one run."""
    sizes: list[int] = []
    hook = engine.base.unet.register_forward_pre_hook(
        lambda module, args: sizes.append(int(args[0].shape[0]))
    )
    try:
        engine(prompt="a cat", height=SIZE, width=SIZE, seed=0, **kwargs)
    finally:
        hook.remove()
    return sizes


def test_engine_makes_exactly_the_floor_calls(tiny_base: Any) -> None:
    workload = Workload("text2video", frames=5, size=SIZE, steps=6, chunk_size=2)
    t0, t1 = workload.t0_t1
    sizes = unet_batches(
        TextToVideoZero(tiny_base),
        num_frames=5,
        num_inference_steps=6,
        chunk_size=2,
        t0=t0,
        t1=t1,
    )
    assert sizes == [frames * workload.branches for frames in call_batches(workload)]


def test_controlnet_engine_makes_exactly_the_floor_calls(
    tiny_base: Any, tiny_controlnet: Any
) -> None:
    workload = Workload("controlnet", frames=3, size=SIZE, steps=3, chunk_size=2)
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    control = ControlInput(tiny_controlnet, dict.fromkeys(range(3), image))
    sizes = unet_batches(
        TextToVideoZero(tiny_base, [tiny_controlnet]),
        num_frames=3,
        num_inference_steps=3,
        chunk_size=2,
        motion_dynamics=False,
        controls=[control],
    )
    assert sizes == [frames * workload.branches for frames in call_batches(workload)]
