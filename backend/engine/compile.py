"""Opt-in ``torch.compile`` of the UNet and ControlNets, kept with the loaded model.

A warm worker serves many jobs, so the compile cost (about a minute per model and shape on
a GPU) is paid once and every later job of that shape runs the compiled kernels. Three
things make that hold:

* one compiled wrapper per module, kept in a weak map keyed by the module: it lives exactly
  as long as the cached model, and torch's compiled code (cached per forward and guarded on
  shapes and attribute values) is reused by the next job;
* cross-frame attention is compile-stable: processors are reinstalled per job, but the
  guards check their attribute *values* (the branch count, the capture flag, the anchor
  slots, which never change keys: see ``AnchorState``), so a new job of the same shape finds
  its graphs; the first change of batch size (a chunk of another length) makes the batch
  dimension dynamic, so the number of graphs is bounded whatever the frame count;
* inductor's on-disk cache lives under the project's cache folder, so a restarted worker
  compiles from cached artifacts.

Every compile (first or re-) is reported with torch's reason; a compile that fails, or a
platform without a compiler, falls back to the eager module with a warning: a job never
fails because of this option.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import torch

log = logging.getLogger(__name__)

# torch's default allows 8 graphs per function; a UNet under cross-frame attention needs up
# to 4 per shape (anchor-only and joint steps, capturing the anchor or reusing it), so two
# sizes in one worker would already spill into eager. 32 bounds it without that cliff.
RECOMPILE_LIMIT = 32


@dataclass(frozen=True)
class CompileOptions:
    """How to compile; the defaults suit a warm worker on a GPU."""

    # inductor generates fused kernels (C++ on the CPU, Triton on CUDA); tests may pass
    # "aot_eager" to check the tracing path without a compiler's cost.
    backend: str = "inductor"
    # None: torch's default mode. "max-autotune" tries more kernels (longer first job).
    mode: str | None = None
    # Where inductor keeps compiled artifacts between worker restarts (None: torch's).
    cache_dir: Path | None = None
    # Compile the batch dimension (guidance branches x frames of a chunk) as dynamic from
    # the first call: chunks of any length then share graphs instead of each new length
    # costing a compile before torch makes the dimension dynamic by itself.
    dynamic_batch: bool = True


@dataclass
class CompileReport:
    """What compiling did during one job, for the log and run.json."""

    requested: bool = False
    # False when compiling was skipped or failed and the eager modules ran instead.
    used: bool = False
    fallback: str | None = None
    # Graphs compiled during this job (0 when the job reused earlier compiles).
    compiles: int = 0
    # Of those, recompiles of an already compiled forward, with torch's reasons.
    recompiles: int = 0
    reasons: list[str] = field(default_factory=list)
    compile_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The report as run.json records it."""
        return {
            "requested": self.requested,
            "used": self.used,
            "fallback": self.fallback,
            "compiles": self.compiles,
            "recompiles": self.recompiles,
            "recompile_reasons": self.reasons,
            "compile_seconds": round(self.compile_seconds, 3),
        }


def compile_unsupported(device: torch.device, options: CompileOptions) -> str | None:
    """Why ``options`` cannot compile on ``device`` here, or None when it can."""
    from torch._dynamo.eval_frame import is_dynamo_supported

    if not is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version.split()[0]} here"
    if options.backend != "inductor":
        return None
    if device.type == "cpu":
        compilers = [os.environ.get("CXX"), "g++", "clang++", "c++"]
        if not any(c and shutil.which(c) for c in compilers):
            return "no C++ compiler (g++, clang++) on PATH, which inductor needs on the CPU"
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed, which inductor needs on CUDA"
    if device.type == "mps":
        return None  # inductor's Metal backend: tried, with the eager fallback if it fails
    return f"inductor does not compile for {device.type}"


class CompiledModule:
    """Calls a module's compiled forward; on a compile failure, the eager one from then on."""

    def __init__(self, module: torch.nn.Module, options: CompileOptions):
        self.module = module
        self.options = options
        self.failure: str | None = None
        self._compiled = torch.compile(module, backend=options.backend, mode=options.mode)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failure is None:
            if self.options.dynamic_batch:
                for tensor in _batched_tensors(args, kwargs):
                    torch._dynamo.maybe_mark_dynamic(tensor, 0)
            try:
                return self._compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as exc:
                # Compile errors surface before the graph runs, so the eager call below
                # redoes the whole forward (the anchor's keys/values included).
                self.failure = _failure_text(exc)
                log.warning(
                    "torch.compile failed for %s, running it uncompiled: %s",
                    type(self.module).__name__,
                    self.failure,
                )
        return self.module(*args, **kwargs)


def _batched_tensors(args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensor arguments with a batch dimension (not the 0-d timestep), nested ones too."""
    found: list[torch.Tensor] = []
    pending: list[Any] = [*args, *kwargs.values()]
    while pending:
        value = pending.pop()
        if isinstance(value, torch.Tensor):
            if value.ndim > 0:
                found.append(value)
        elif isinstance(value, (list, tuple)):
            pending.extend(value)
        elif isinstance(value, dict):
            pending.extend(value.values())
    return found


# One compiled wrapper per module (and options), dropped with the module.
_COMPILED: WeakKeyDictionary[torch.nn.Module, dict[CompileOptions, CompiledModule]] = (
    WeakKeyDictionary()
)


def compiled(module: torch.nn.Module, options: CompileOptions) -> CompiledModule:
    """The compiled wrapper of ``module`` (made once, then the same one for every job)."""
    per_options = _COMPILED.setdefault(module, {})
    if options not in per_options:
        _configure(options)
        per_options[options] = CompiledModule(module, options)
    return per_options[options]


def forwards(
    modules: list[torch.nn.Module], options: CompileOptions | None, device: torch.device
) -> tuple[list[Callable[..., Any]], str | None]:
    """The callables that run ``modules``: compiled ones, or the modules and why not."""
    if options is None:
        return list(modules), None
    reason = compile_unsupported(device, options)
    if reason is not None:
        log.warning("compile is on, but %s: running uncompiled", reason)
        return list(modules), reason
    return [compiled(m, options) for m in modules], None


def finish_report(report: CompileReport, engine: Any) -> CompileReport:
    """Fill in whether ``engine``'s job ran compiled, or why it fell back to eager."""
    failures = [c.failure for c in engine.forward_calls if isinstance(c, CompiledModule)]
    report.fallback = engine.compile_skipped or next((f for f in failures if f), None)
    report.used = report.requested and report.fallback is None
    return report


def _configure(options: CompileOptions) -> None:
    """Point inductor's cache at the project's folder and lift torch's recompile limit."""
    if options.cache_dir is not None:
        options.cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(options.cache_dir / "inductor")
        os.environ.setdefault("TRITON_CACHE_DIR", str(options.cache_dir / "triton"))
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)


class CompileWatch:
    """Collects the compiles torch records while a job runs (``with CompileWatch() as w``)."""

    def __init__(self, report: CompileReport):
        self.report = report
        self._start = 0.0

    def __enter__(self) -> CompileWatch:
        self._start = time.time()
        return self

    def __exit__(self, *exc: object) -> None:
        # torch keeps the latest records in a bounded queue: pick this job's by start time.
        for metric in _metrics():
            if (metric.start_time or 0.0) < self._start:
                continue
            if not metric.has_guarded_code:
                continue  # a frame torch looked at and left to eager (no graph)
            self.report.compiles += 1
            self.report.compile_seconds += metric.entire_frame_compile_time_s or 0.0
            if metric.recompile_reason:
                self.report.recompiles += 1
                self.report.reasons.append(short_reason(metric.recompile_reason))
        if self.report.recompiles:
            log.info(
                "torch.compile: %d recompile(s) in this job: %s",
                self.report.recompiles,
                "; ".join(self.report.reasons[:3]),
            )


def _metrics() -> list[Any]:
    """torch's per-frame compilation records so far (oldest first)."""
    from torch._dynamo.utils import get_compilation_metrics

    return list(get_compilation_metrics())


def short_reason(reason: str) -> str:
    """torch's guard-failure text, the module path cut down to the layer's last names."""
    # "self.__dict__['_modules']['down_blocks']._modules['1']...['attn1'].processor.state.
    # capture == True  # if self.state.capture: ..." -> "attn1.processor.state.capture == True"
    text = re.sub(
        r"self(?:\.__dict__)?(?:\[[^\]]*\]|\._modules|\.__dict__)*\['(\w+)'\]", r"\1", reason
    )
    text = re.sub(r"  # .*", "", text)  # the source line torch appends
    return _one_line(text, 300)


def _failure_text(exc: BaseException) -> str:
    """One line saying why a compile failed: the compiler's own error where torch wraps it."""
    inner = getattr(exc, "inner_exception", None) or exc.__cause__
    if inner is None:
        return _one_line(exc)
    return _one_line(f"{type(inner).__name__}: {_one_line(inner)}")


def _one_line(text: object, limit: int = 200) -> str:
    """A message's first line, cut to ``limit`` characters."""
    lines = str(text).strip().splitlines()
    first = lines[0] if lines else type(text).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."
