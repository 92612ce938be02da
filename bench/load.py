"""Model loading time and peak memory with and without low_cpu_mem_usage (accelerate).

Saves SD 1.5's architecture with random weights (or the builtin tiny model) as a diffusers
folder once, then loads it with ``backend.models.loading.load_base_model`` in fresh child processes,
alternating the two cases ``--repeats`` times: "without" forces ``low_cpu_mem_usage=False``
(what the backend did before accelerate was a dependency: random initialisation of every
module, then a second copy of the weights), "with" loads the weights into empty modules.
Each child reports the wall time of the load and the peak resident memory above the
process's memory before it (imports done: a worker pays them once), sampled every 10 ms;
"weights read" adds reading every weight once (safetensors are memory-mapped, so a load
can return before the weights are read; the first denoising step reads them).

    python -m bench.load --model sd15 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("without", "with")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", choices=("tiny", "sd15"), default="sd15")
    parser.add_argument("--repeats", type=int, default=2, help="child processes per case")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--folder", type=Path, help="load this saved folder instead of a new one")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # JSON spec of one load
    return parser.parse_args(argv)


def child(spec: dict) -> dict:
    """Load the folder once in this process; return seconds and memory growth."""
    import torch

    import backend.models.loading as models
    from bench.measure import MIB, PeakMemory, current_rss, peak_rss

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["case"] == "without":
        models.low_cpu_mem_usage = lambda: False  # the backend before accelerate
    elif not models.low_cpu_mem_usage():
        raise RuntimeError("accelerate is not installed: pip install accelerate")
    # Imports before the clock: diffusers and transformers load their model modules lazily,
    # and a worker pays that once per process, not per model.
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    device = torch.device("cpu")
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        base = models.load_base_model(spec["folder"], device=device, dtype=torch.float32)
        seconds = time.perf_counter() - started
        loaded_mib = (current_rss() - memory.start) / MIB
        # Safetensors are memory-mapped: a load can return before the weights are read.
        # Read every weight once, as the first denoising step would.
        weights = [p for m in (base.unet, base.vae, base.text_encoder) for p in m.parameters()]
        for p in weights:
            p.sum()
        ready = time.perf_counter() - started
    return {
        "seconds": seconds,
        "ready_seconds": ready,
        "loaded_mib": loaded_mib,
        "growth_mib": memory.growth / MIB,
        "peak_mib": memory.peak / MIB,
        "process_peak_mib": peak_rss() / MIB,
        "weights_mib": sum(p.numel() * p.element_size() for p in weights) / MIB,
    }


def spawn(case: str, folder: Path, threads: int) -> dict:
    spec = {"case": case, "folder": str(folder), "threads": threads}
    cmd = [sys.executable, "-m", "bench.load", "--child", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def save_folder(kind: str, folder: Path) -> Path:
    """The model folder to load: SD 1.5 architecture (random weights) or the tiny model."""
    if kind == "tiny":
        from backend.models.tiny import build_tiny

        return build_tiny("tiny", folder)
    from bench.models import save_sd15_folder

    return save_sd15_folder(folder)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from bench.measure import cpu_name

    print("command: python -m bench.load " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"machine: {cpu_name()}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="t2vz-load-") as tmp:
        folder = args.folder
        if folder is None:
            started = time.perf_counter()
            folder = save_folder(args.model, Path(tmp) / args.model)
            print(f"saved {args.model} to a folder in {time.perf_counter() - started:.1f} s")
        rows: dict[str, list[dict]] = {case: [] for case in CASES}
        for r in range(args.repeats):
            order = CASES if r % 2 == 0 else CASES[::-1]  # alternate so drift hits both
            for case in order:
                row = spawn(case, folder, args.threads)
                rows[case].append(row)
                print(
                    f"  {case:<8} accelerate: load {row['seconds']:6.2f} s "
                    f"(+{row['loaded_mib']:.0f} MiB), weights read {row['ready_seconds']:6.2f} s, "
                    "growth "
                    f"{row['growth_mib']:8.1f} MiB, process peak {row['process_peak_mib']:8.1f} "
                    f"MiB (weights {row['weights_mib']:.1f} MiB)",
                    flush=True,
                )
    return report(rows)


def report(rows: dict[str, list[dict]]) -> int:
    """Median per case and the with / without ratios."""
    med = {
        case: {
            k: statistics.median(r[k] for r in rows[case])
            for k in ("seconds", "ready_seconds", "growth_mib")
        }
        for case in CASES
    }
    for case in CASES:
        print(
            f"  median {case:<8}: load {med[case]['seconds']:7.2f} s, weights read "
            f"{med[case]['ready_seconds']:7.2f} s, "
            f"growth {med[case]['growth_mib']:8.1f} MiB"
        )
    for key, label in (("seconds", "load time"), ("ready_seconds", "weights read")):
        ratio = med["with"][key] / med["without"][key]
        print(f"  {label:<12} with / without accelerate: {ratio:.3f}")
    print(
        f"  {'peak memory':<12} with / without accelerate: "
        f"{med['with']['growth_mib'] / med['without']['growth_mib']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
