"""The cluster executor's cost: dispatch and transfer against compute, and what it buys.

Measured side by side in one run, on a local Ray head this script starts on 127.0.0.1
(``--workers`` CPU actors; or an existing cluster with ``--address``):

* per shard: wall time from dispatch to its last frame back, against the seconds the actor
  spent computing it (the difference is dispatch, transfer and writing);
* a ``--frames`` job (default 32) run in this process, against the same job on the actors;
* from the measured per-frame cost and per-shard overhead, predicted wall time and speedup
  for 1, 2, 4, 8 and 16 GPUs on ``--predict-frames`` (default 240) frames.

The model of the prediction: a shard costs the measured per-shard overhead plus the
measured seconds per frame times the frames it computes (its own, frame 1 and the up to
chunk_size - 1 frames that fill its last chunk; see cluster.plan_shards); shards run in
parallel, one per GPU, so the job takes as long as its largest shard. It assumes identical
GPUs, an overhead that does not grow with the shard (true of dispatch; transfer grows with
the frames' bytes, measured here at the job's size) and no queueing behind other jobs.

    .venv/bin/python -m bench.cluster                      # tiny model, 64x64, 2 CPU actors
    .venv/bin/python -m bench.cluster --model builtin:shapes --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Ray on loopback only (this machine's processes, nothing reachable from the network);
# read when ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402

from backend.protocol import validate_job  # noqa: E402
from backend.service import cluster  # noqa: E402
from backend.service.runner import run_job  # noqa: E402
from bench.measure import cpu_name  # noqa: E402


def start_head(workers: int) -> tuple[cluster.ClusterConfig, str]:
    """`ray start --head` on a free loopback port with ``workers`` CPUs and a fresh token."""
    folder = tempfile.mkdtemp(prefix="t2vz-ray-", dir="/tmp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = ""  # the workers import the backend the job sends (py_modules)
    ray_cli = str(Path(sys.executable).parent / "ray")
    cmd = [ray_cli, "start", "--head", f"--port={port}", f"--num-cpus={workers}"]
    cmd += ["--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"]
    subprocess.run([*cmd, f"--temp-dir={folder}"], env=env, check=True, capture_output=True)
    return cluster.ClusterConfig(f"127.0.0.1:{port}", token), folder


def stop_head(folder: str) -> None:
    """End the processes of the head started in ``folder`` (and their children), by id."""
    import psutil

    found = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.pid != os.getpid() and any(folder in a for a in p.info["cmdline"] or ())
    ]
    for proc in list(found):
        with contextlib.suppress(psutil.NoSuchProcess):
            found += proc.children(recursive=True)
    for proc in found:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(found, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    shutil.rmtree(folder, ignore_errors=True)


def job(out: Path, args: argparse.Namespace, frames: int) -> Any:
    """The benchmark's job: ``frames`` frames of ``--model`` at ``--size``, no mp4."""
    return validate_job(
        {
            "prompt": "a red circle on a blue background",
            "out": str(out),
            "model": args.model,
            "frames": frames,
            "width": args.size,
            "height": args.size,
            "steps": args.steps,
            "chunk_size": args.chunk_size,
            "device": "cpu",
            "dtype": "float32",
            "write_mp4": False,
        }
    )


def predict(per_frame: float, overhead: float, frames: int, gpus: int, chunk: int) -> float:
    """Predicted wall seconds of ``frames`` frames on ``gpus`` GPUs (see the module's model)."""
    shards = cluster.plan_shards(list(range(frames)), math.ceil(frames / gpus), chunk)
    largest = max(len(set(s.computed) | set(s.frames) | {0}) for s in shards)
    return overhead + per_frame * largest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="CPU actors of the local head")
    parser.add_argument("--address", help="an existing cluster instead of a local head")
    parser.add_argument("--token")
    parser.add_argument("--predict-frames", type=int, default=240)
    args = parser.parse_args(argv)
    folder = None
    if args.address:
        config = cluster.ClusterConfig(args.address, args.token)
    else:
        config, folder = start_head(args.workers)
    out = Path(tempfile.mkdtemp(prefix="t2vz-bench-cluster-"))
    try:
        # One local process against the actors, each with one thread: a CPU actor gets one
        # core (num_cpus=1), and more threads than free cores on a shared machine slow torch
        # down many times over (here: 32 frames in 24 s with 2 threads while colleagues ran).
        torch.set_num_threads(1)
        print(
            f"CPU: {cpu_name()}; torch {torch.__version__}; ray {cluster.import_ray().__version__}"
        )
        print(
            f"job: {args.model}, {args.size}x{args.size}, {args.steps} steps, chunk {args.chunk_size}"
        )
        started = time.perf_counter()
        # The same job once first: every actor up, its model loaded, its kernels warm.
        cluster.run_on_cluster(job(out / "warm", args, args.frames), config)
        print(f"cluster warm-up (actors start, models load): {time.perf_counter() - started:.1f} s")
        run_job(job(out / "warm-local", args, 2))
        started = time.perf_counter()
        run_job(job(out / "local", args, args.frames))
        local = time.perf_counter() - started
        started = time.perf_counter()
        cluster.run_on_cluster(job(out / "remote", args, args.frames), config)
        remote = time.perf_counter() - started
        info = json.loads((out / "remote" / "run.json").read_text())["cluster"]
        timings = info["shard_timings"]
        print(f"\n{args.frames} frames: one local process (1 thread) {local:.2f} s, "
              f"{len(timings)} shards on {args.workers} actors {remote:.2f} s "
              f"(speedup {local / remote:.2f}x)")  # fmt: skip
        print("\nshard  frames  computed  wall s  compute s  overhead s  overhead/compute")
        for i, t in enumerate(timings):
            over = t["seconds"] - t["compute_seconds"]
            print(f"{i:5d}  {t['frames']:6d}  {t['computed']:8d}  {t['seconds']:6.2f}  "
                  f"{t['compute_seconds']:9.2f}  {over:10.3f}  {over / t['compute_seconds']:16.1%}")  # fmt: skip
        overhead = sum(t["seconds"] - t["compute_seconds"] for t in timings) / len(timings)
        per_frame = sum(t["compute_seconds"] for t in timings) / sum(t["computed"] for t in timings)
        print(f"\nmeasured: {per_frame:.4f} s a computed frame, {overhead:.3f} s overhead a shard")
        n = args.predict_frames
        chunks = sorted({args.chunk_size, 4}, reverse=True)
        print(f"\npredicted, {n} frames (model: see bench/cluster.py), by the job's chunk size")
        print("GPUs" + "".join(f"  chunk {c}: wall s, speedup" for c in chunks))
        for gpus in (1, 2, 4, 8, 16):
            row = f"{gpus:4d}"
            for c in chunks:
                wall = predict(per_frame, overhead, n, gpus, c)
                row += f"  {wall:14.1f} {predict(per_frame, overhead, n, 1, c) / wall:6.2f}x"
            print(row)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if folder is not None:
            import ray

            if ray.is_initialized():
                ray.shutdown()
            stop_head(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
