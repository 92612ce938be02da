"""bench/: the floor runs exactly the model evaluations our engine runs (no timing here)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from backend.engine.pipeline import ControlInput, TextToVideoZero
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


def test_kernel_rows_sum_device_time_per_kernel_and_mark_attention() -> None:
    """bench.kernels adds up the CUDA kernels of a profile by name (µs -> ms), largest
    first, skips CPU events, and counts flash / memory-efficient / cuDNN SDPA kernels as
    attention (the names seen on an H100) but not a plain GEMM or copy."""
    from types import SimpleNamespace

    from bench.kernels import attention_share, kernel_rows

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    flash = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64"
    gemm = "nvjet_sm90_hsh_128x256_64x4_2x1_v_bz_coopA_bias_TNN"
    copy = "void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>"
    events = [
        SimpleNamespace(name=flash, device_type=cuda, device_time=3000.0),
        SimpleNamespace(name=gemm, device_type=cuda, device_time=4000.0),
        SimpleNamespace(name=flash, device_type=cuda, device_time=1000.0),
        SimpleNamespace(name=copy, device_type=cuda, device_time=2000.0),
        SimpleNamespace(name="aten::mm", device_type=cpu, device_time=99000.0),
    ]
    rows = kernel_rows(events)
    assert rows == [(flash, 4.0, 2), (gemm, 4.0, 1), (copy, 2.0, 1)]
    assert attention_share(rows) == pytest.approx(0.4)  # 4 of 10 ms
    assert attention_share([]) == 0.0
    named = ["pytorch_flash::flash_fwd_kernel", "fmha_cutlassF_f16_aligned_64x64_rf_sm80"]
    assert attention_share([(n, 1.0, 1) for n in named]) == 1.0


def test_kernels_refuses_a_device_without_cuda_kernels() -> None:
    from bench.kernels import main

    with pytest.raises(SystemExit) as stop:
        main(["--device", "cpu"])
    assert stop.value.code == 2  # argparse's usage error, naming the device (stderr)


def test_quality_and_formats_take_a_device() -> None:
    """bench.quality and bench.formats run on a named device (CUDA on a GPU machine)."""
    from bench.formats import parse_args as formats_args
    from bench.quality import parse_args as quality_args

    assert quality_args([]).device == "cpu"
    assert quality_args(["--device", "cuda"]).device == "cuda"
    got = formats_args(["--device", "cuda", "--dtype", "float16"])
    assert (got.device, got.dtype) == ("cuda", "float16")


def test_demo_pan_varies_only_the_flags_it_removes() -> None:
    """bench.demo_pan compares the demo with and without its t0/t1: the rest must stay."""
    from bench.demo_pan import demo_flag, without

    args = ["--model", "m", "--t0", "8", "--steps", "20", "--t1", "10", "--seed", "1"]
    assert without(args, "--t0", "--t1") == ["--model", "m", "--steps", "20", "--seed", "1"]
    assert without(args) == args
    assert demo_flag(args, "--steps") == "20"


def test_run_adds_compiled_rows_and_their_ratios_only_when_asked(tiny_base: Any) -> None:
    from bench import run
    from bench.measure import Measurement
    from bench.models import BenchModels

    workload = Workload("text2video", 8, 64, 2, 8)
    for flag, present in (([], False), (["--compile", "--compile-backend", "aot_eager"], True)):
        args = run.parse_args(["--chunk-size", "4", "--no-diffusers", "--no-plain", *flag])
        labels = set(run.variants_for(BenchModels(tiny_base), workload, args))
        assert ({"compiled c8", "compiled c4"} <= labels) is present
        assert {"ours c8", "ours c4", "floor c8", "floor c4"} <= labels
    assert run.compile_options(args).backend == "aot_eager"
    results = {
        "ours c8": Measurement([2.0]),
        "compiled c8": Measurement([1.5]),
        "floor c8": Measurement([1.0]),
    }
    lines = "\n".join(run.ratio_lines(results, 8, 8))
    assert "compiled / ours (chunk 8)" in lines and "0.750" in lines
    assert "compiled / floor (chunk 8)" in lines and "1.500" in lines
