"""Timing and peak-memory measurement shared by the benchmark scripts.

Time: wall clock around one call, CUDA synchronised, inside ``torch.inference_mode``.
Memory on CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated at the start.
Memory on CPU: a thread samples the process's current resident set (/proc/self/statm)
every few milliseconds; the peak minus the RSS at the start is the run's growth. Memory
the allocator kept from earlier runs hides part of a later run's growth, so exact CPU
figures come from fresh child processes (bench/memory.py).
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the platform's processor string)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA (with the CPU beside it), else the CPU model."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CPU {cpu_name()})"
    return cpu_name()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a clock read after
    it includes that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def peak_rss() -> int:
    """High-water mark of this process's resident set (VmHWM), in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Context manager: ``growth`` (peak above the start) and ``peak`` (absolute), in bytes."""

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device = device
        self.interval = interval
        self.start = self.peak = self.growth = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = current_rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak = max(self.peak, current_rss())
        self.growth = self.peak - self.start


@dataclass
class Measurement:
    """Repeated measurements of one variant."""

    seconds: list[float] = field(default_factory=list)
    growth: list[int] = field(default_factory=list)
    peak: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def max_growth_mib(self) -> float:
        return max(self.growth) / MIB

    @property
    def max_peak_mib(self) -> float:
        return max(self.peak) / MIB


def measure_once(fn: Callable[[], object], device: torch.device, into: Measurement) -> None:
    """Run ``fn`` once under inference mode and record its time and memory into ``into``."""
    with torch.inference_mode(), PeakMemory(device) as memory:
        started = time.perf_counter()
        fn()
        synchronize(device)
        into.seconds.append(time.perf_counter() - started)
    into.growth.append(memory.growth)
    into.peak.append(memory.peak)


def interleaved(
    variants: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> dict[str, Measurement]:
    """Time every variant ``repeats`` times, rotating the order each round so drift hits all."""
    names = list(variants)
    results = {name: Measurement() for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            measure_once(variants[name], device, results[name])
            log(f"  round {r + 1}/{repeats} {name}: {results[name].seconds[-1]:.3f} s")
    return results


def warm_up(variants: dict[str, Callable[[], object]], device: torch.device) -> None:
    """Run each variant once, untimed (first-call kernel selection, allocator growth)."""
    for fn in variants.values():
        with torch.inference_mode():
            fn()
    synchronize(device)
