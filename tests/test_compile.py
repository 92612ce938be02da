"""backend/engine/compile.py: torch.compile of the UNet / ControlNets, reuse, recompiles, fallback.

The graphs are traced with torch's ``aot_eager`` backend: the same dynamo tracing, guards
and recompiles as inductor without its code generation (inductor took 300 s for the first
8-frame job of the tiny model on this 2-core machine; aot_eager ~15 s a graph).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from backend.engine import compile as compiling
from backend.engine.compile import (
    CompiledModule,
    CompileOptions,
    CompileReport,
    CompileWatch,
    compile_unsupported,
    finish_report,
    short_reason,
)
from backend.engine.pipeline import ControlInput, TextToVideoZero
from backend.protocol import JobError, validate_job

TRACE = CompileOptions(backend="aot_eager")
# Shared (ControlNet-style) noise and no motion phase: the joint steps alone, so a job
# compiles the two graphs every chunked job needs (the chunk that stores the anchor's
# keys/values and the chunks that reuse them) and nothing else.
RUN = {
    "prompt": "a cat",
    "height": 64,
    "width": 64,
    "num_inference_steps": 2,
    "motion_dynamics": False,
}


def run(engine: TextToVideoZero, frames: int, chunk: int) -> tuple[torch.Tensor, CompileReport]:
    """The engine's latents for ``frames`` frames in chunks of ``chunk``, and what compiled."""
    report = CompileReport(requested=True)
    with CompileWatch(report):
        latents = engine(num_frames=frames, chunk_size=chunk, **RUN)
    return latents, report


@pytest.fixture
def fresh_dynamo() -> None:
    """No compiled code from earlier tests: counts start from zero."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_jobs_match_eager_and_reuse_their_graphs(
    tiny_base: Any, fresh_dynamo: None
) -> None:
    eager = TextToVideoZero(tiny_base)
    engine = TextToVideoZero(tiny_base, compile_options=TRACE)
    assert isinstance(engine.forward_calls[0], CompiledModule)
    # The same wrapper for the next engine on this model: its compiled code is kept.
    assert (
        TextToVideoZero(tiny_base, compile_options=TRACE).forward_calls[0]
        is engine.forward_calls[0]
    )

    first, report = run(engine, 4, 2)
    torch.testing.assert_close(
        first, eager(num_frames=4, chunk_size=2, **RUN), atol=1e-4, rtol=1e-4
    )
    # Measured: 2 graphs, the chunk that stores the anchor's keys/values and, recompiled on
    # the capture flag, the chunks that reuse them.
    assert report.compiles == 2 and report.compile_seconds > 0
    assert report.reasons == ["0/0: attn1.processor.state.capture == True"]

    again, report = run(engine, 4, 2)
    assert report.compiles == 0  # the next job of the same shape reuses every graph
    torch.testing.assert_close(again, first, atol=0, rtol=0)

    # The batch is dynamic from the start; a chunk of one frame (5 = 2 + 2 + 1) is the one
    # size torch specializes (measured: 1 more graph). Then no frame count or chunk size
    # compiles again: never a compile per chunk.
    _, report = run(engine, 5, 2)
    assert report.compiles <= 1
    for frames, chunk in ((9, 2), (6, 3)):
        latents, report = run(engine, frames, chunk)
        assert report.compiles == 0, (frames, chunk, report.reasons)
    torch.testing.assert_close(
        latents, eager(num_frames=6, chunk_size=3, **RUN), atol=1e-4, rtol=1e-4
    )


def test_no_compiler_runs_eager_and_says_why(
    tiny_base: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    reason = compile_unsupported(torch.device("cpu"), CompileOptions())
    assert reason is not None and "C++ compiler" in reason
    assert compile_unsupported(torch.device("cpu"), TRACE) is None  # aot_eager needs none

    with caplog.at_level(logging.WARNING):
        engine = TextToVideoZero(tiny_base, compile_options=CompileOptions())
    assert engine.compile_skipped == reason and reason in caplog.text
    assert engine.forward_calls == [tiny_base.unet]  # the module itself, uncompiled
    report = finish_report(CompileReport(requested=True), engine)
    assert (report.used, report.fallback) == (False, reason)


def test_a_failing_compile_falls_back_to_eager_and_the_job_completes(
    tiny_base: Any, fresh_dynamo: None, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(graph: Any, inputs: Any) -> Any:
        raise RuntimeError("the compiler crashed")

    torch._dynamo.reset()
    engine = TextToVideoZero(tiny_base)
    call = CompiledModule(tiny_base.unet, TRACE)
    call._compiled = torch.compile(tiny_base.unet, backend=broken)
    engine._unet_call = call
    with caplog.at_level(logging.WARNING):
        latents = engine(num_frames=2, chunk_size=2, **RUN)
    expected = TextToVideoZero(tiny_base)(num_frames=2, chunk_size=2, **RUN)
    torch.testing.assert_close(latents, expected, atol=0, rtol=0)
    assert call.failure is not None and "the compiler crashed" in call.failure
    assert "running it uncompiled" in caplog.text
    report = finish_report(CompileReport(requested=True), engine)
    assert report.fallback == call.failure and not report.used


def test_controlnets_compile_too(tiny_base: Any, tiny_controlnet: Any) -> None:
    engine = TextToVideoZero(tiny_base, [tiny_controlnet], compile_options=TRACE)
    calls = engine.forward_calls
    assert [c.module for c in calls] == [tiny_base.unet, tiny_controlnet]
    # The engine checks controls against its modules, not against the compiled wrappers.
    control = ControlInput(tiny_controlnet, {0: torch.zeros(3, 64, 64)}, 1.0)
    engine.check_inputs("x", 64, 64, 1, [0], [control], None)


def test_cache_folder_and_recompile_limit_are_set(tmp_path: Path) -> None:
    options = CompileOptions(backend="aot_eager", cache_dir=tmp_path / "compile")
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        compiling._configure(options)
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile" / "inductor")
        assert (tmp_path / "compile").is_dir()
        assert torch._dynamo.config.recompile_limit >= compiling.RECOMPILE_LIMIT
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


def test_recompile_reasons_name_the_layer_not_the_module_path() -> None:
    torch_text = (
        "0/1: self.__dict__['_modules']['down_blocks']._modules['1']._modules['attentions']"
        "._modules['0'].__dict__['_modules']['transformer_blocks']._modules['0']._modules"
        "['attn1'].processor.state.capture == True  # if self.state.capture:  # attention.py:83"
    )
    assert short_reason(torch_text) == "0/1: attn1.processor.state.capture == True"
    size = "0/0: tensor 'args[0]' size mismatch at index 0. expected 2, actual 16"
    assert short_reason(size) == size


def test_the_job_field_is_a_bool_and_recorded(tmp_path: Path) -> None:
    job = validate_job({"prompt": "x", "out": str(tmp_path / "o"), "compile": True})
    assert job.compile is True and job.to_dict()["compile"] is True
    assert validate_job({"prompt": "x", "out": str(tmp_path / "o")}).compile is False
    with pytest.raises(JobError, match="compile"):
        validate_job({"prompt": "x", "out": str(tmp_path / "o"), "compile": "yes"})


@pytest.mark.slow
def test_a_compiled_job_records_what_compiled_in_run_json(
    tmp_path: Path, tiny_models: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backend.models.loading import ModelCache
    from backend.service import runner
    from backend.service.cli import build_parser, job_from_args

    monkeypatch.setattr(runner, "job_compile_options", lambda job: TRACE if job.compile else None)
    args = build_parser().parse_args(
        ["generate", "--prompt", "x", "--model", "builtin:tiny", "--frames", "2", "--steps", "2",
         "--width", "64", "--height", "64", "--device", "cpu", "--dtype", "float32",
         "--no-mp4", "--compile", "--out", str(tmp_path / "out")]
    )  # fmt: skip
    job = validate_job(job_from_args(args))
    assert job.compile
    runner.run_job(job, ModelCache())
    info = json.loads((tmp_path / "out" / "run.json").read_text())["compile"]
    assert info["requested"] and info["used"] and info["fallback"] is None
    assert info["recompiles"] == len(info["recompile_reasons"])
    plain = validate_job({**job.to_dict(), "compile": False, "out": str(tmp_path / "plain")})
    runner.run_job(plain, ModelCache())
    assert "compile" not in json.loads((tmp_path / "plain" / "run.json").read_text())
