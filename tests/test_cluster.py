"""backend/service/cluster.py on a real Ray cluster started here, on 127.0.0.1.

One head node (``ray start --head --num-cpus 2``: two CPU actors) for the module, with
token authentication, stopped by its own process ids. The workers import the backend the
job sends them (``py_modules``), not this checkout: their PYTHONPATH holds only the
network block. Results are compared byte for byte with the same job run in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# Ray on one machine, on loopback only: its processes talk over 127.0.0.1 (the network
# block of the test processes allows nothing else) and the test cluster is not reachable
# from the network. Ray reads this when it is imported (ray_constants).
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
os.environ.update(LOOPBACK_ONLY)
ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from backend.engine.pipeline import Cancelled  # noqa: E402
from backend.media.video_io import VideoInputError, write_png  # noqa: E402
from backend.models.loading import ModelCache  # noqa: E402
from backend.protocol import validate_job  # noqa: E402
from backend.service import cluster  # noqa: E402
from backend.service.cluster import ClusterConfig, ClusterError, run_on_cluster  # noqa: E402
from backend.service.runner import JobEvents, run_job  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_processes(folder: str) -> list[psutil.Process]:
    """The processes `ray start` left running for the temp folder ``folder``, with children."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(folder in part for part in proc.info["cmdline"] or ()):
            found.append(proc)
    for proc in list(found):
        with contextlib.suppress(psutil.NoSuchProcess):
            found.extend(proc.children(recursive=True))
    return list({p.pid: p for p in found}.values())


@pytest.fixture(scope="module")
def head(backend_env: dict, tiny_models: dict) -> Iterator[ClusterConfig]:
    """A local Ray head with 2 CPUs and token auth; this process connected to it."""
    folder = tempfile.mkdtemp(prefix="t2vz-ray-", dir="/tmp")  # unix socket paths are short
    token = secrets.token_hex(16)
    port = free_port()
    env = dict(backend_env)
    env["PYTHONPATH"] = backend_env["PYTHONPATH"].split(os.pathsep)[0]  # netblock only
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    env.update(LOOPBACK_ONLY)
    start = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}"]
    start += ["--num-cpus=2", "--num-gpus=0", "--include-dashboard=false"]
    start += ["--disable-usage-stats", f"--temp-dir={folder}"]
    config = ClusterConfig(f"127.0.0.1:{port}", token)
    try:  # a start that fails half-way leaves processes too: they are ended below
        done = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        cluster.connect(config)
        yield config
    finally:
        if ray.is_initialized():
            ray.shutdown()
        processes = ray_processes(folder)
        for proc in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(processes, timeout=3)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def cache(tiny_models: dict) -> ModelCache:
    return ModelCache(max_bases=2)


def make_job(out: Path, **fields: Any):
    data = {
        "prompt": "a cat",
        "out": str(out),
        "model": "builtin:tiny",
        "frames": 9,
        "width": 64,
        "height": 64,
        "steps": 3,
        "chunk_size": 3,
        "device": "cpu",
        "dtype": "float32",
        "write_mp4": True,
        "save_latents": True,
        **fields,
    }
    return validate_job(data)


def frames_folder(path: Path, count: int, seed: int) -> Path:
    """``count`` random 64x64 PNG frames: a control or source video."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    for i in range(count):
        write_png(path / f"{i:04d}.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return path


def mp4_frames(path: Path) -> list[np.ndarray]:
    """The decoded RGB frames of an mp4."""
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def assert_same_result(local: Path, remote: Path) -> None:
    """The same files, byte for byte; job.json equal but for ``out``; run.json says cluster."""
    names = sorted(p.name for p in local.iterdir())
    assert names == sorted(p.name for p in remote.iterdir())
    for name in names:
        if name in ("job.json", "run.json", "video.mp4"):
            continue
        assert (local / name).read_bytes() == (remote / name).read_bytes(), name
    if "video.mp4" in names:
        # x264 (PyAV, crf 18, threads) is not deterministic here: the same PNGs encoded
        # twice in one process decoded 0.19 apart on average (max 13) in one frame of 9,
        # against 12 between the PNGs and either encoding (random-weight frames are noise).
        # So the mp4 holds the same frames within a tenth of the encoder's own error.
        a, b = mp4_frames(local / "video.mp4"), mp4_frames(remote / "video.mp4")
        assert len(a) == len(b) == len(list(local.glob("*.png")))
        for x, y in zip(a, b, strict=True):
            assert np.abs(x.astype(int) - y).mean() < 1.2
    a, b = (json.loads((d / "job.json").read_text()) for d in (local, remote))
    assert {**a, "out": None} == {**b, "out": None}
    assert "cluster" in json.loads((remote / "run.json").read_text())


MODES = {
    "text2video": {},
    "controlnet": {"mode": "controlnet", "write_mp4": False},
    # Pix2pix shards also align to the engine's VAE-encode batches (4): chunks of 2 keep
    # their grid at 4 frames, so 12 frames still make 3 shards.
    "pix2pix": {
        "mode": "pix2pix",
        "model": "builtin:tiny-pix2pix",
        "prompt": "make it snow",
        "chunk_size": 2,
        "frames": 12,
        "write_mp4": False,
    },
}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_cluster_run_equals_the_local_run_byte_for_byte(
    head: ClusterConfig, cache: ModelCache, tmp_path: Path, mode: str
) -> None:
    fields = dict(MODES[mode])
    frames = fields.get("frames", 9)
    if mode == "controlnet":
        control = str(frames_folder(tmp_path / "control", frames, seed=1))
        fields["controlnets"] = [{"model": "builtin:tiny-controlnet", "control": control}]
    if mode == "pix2pix":
        fields["video"] = str(frames_folder(tmp_path / "source", frames, seed=2))
    run_job(make_job(tmp_path / "local", **fields), cache)
    progress: list[tuple] = []
    # 3 shards on 2 actors: shards that batch frames otherwise than the local run differ
    # in the last bits (PNG bytes too, once seen) unless plan_shards aligns them.
    config = ClusterConfig(head.address, head.token, shard_size=3)
    result = run_on_cluster(
        make_job(tmp_path / "remote", **fields),
        config,
        JobEvents(progress=lambda *a: progress.append(a)),
    )
    assert_same_result(tmp_path / "local", tmp_path / "remote")
    names = [f"frame_{i:05d}.png" for i in range(1, frames + 1)]
    assert result.frames == [str(tmp_path / "remote" / n) for n in names]
    assert json.loads((tmp_path / "remote" / "run.json").read_text())["cluster"]["shards"] == 3
    frames_done = [p[2] for p in progress]
    assert frames_done == sorted(frames_done) and frames_done[-1] == frames  # all shards'
    assert progress[-1][4] == pytest.approx(1.0)


def test_a_frame_range_job_with_a_local_folder_model_sent_to_the_workers(
    head: ClusterConfig, cache: ModelCache, tiny_models: dict, tmp_path: Path
) -> None:
    """A base model given as a local folder travels to the workers as bytes."""
    fields = {"model": str(tiny_models["tiny"]), "frame_range": [3, 6], "write_mp4": False}
    run_job(make_job(tmp_path / "local", **fields), cache)
    run_on_cluster(
        make_job(tmp_path / "remote", **fields), ClusterConfig(head.address, head.token, 2)
    )
    assert_same_result(tmp_path / "local", tmp_path / "remote")


def _batch_places(frames: list[int], size: int) -> dict[int, tuple[int, int]]:
    """frame -> (its batch's size, its place in it) when ``frames`` go in batches of ``size``."""
    batches = [frames[i : i + size] for i in range(0, len(frames), size)]
    return {f: (len(b), i) for b in batches for i, f in enumerate(b)}


@pytest.mark.parametrize(
    ("frame_ids", "shard_size", "chunk_size", "encode_batch"),
    [
        (range(9), 3, 3, 1),
        (range(240), 30, 8, 1),
        (range(240), 30, 8, 4),
        (range(10), 3, 2, 4),
        (range(3, 50), 7, 5, 1),  # a frame range: frame 1 computed, not delivered
        (range(13), 4, 1, 1),
        (range(5), 16, 8, 4),
    ],
)
def test_shards_batch_every_frame_as_the_local_run_does(
    frame_ids: range, shard_size: int, chunk_size: int, encode_batch: int
) -> None:
    frames = list(frame_ids)
    shards = cluster.plan_shards(frames, shard_size, chunk_size, encode_batch)
    delivered = [f for s in shards for f in s.frames]
    assert delivered == frames  # every frame once, in order
    local = sorted(set(frames) | {0})
    for size in {chunk_size, encode_batch}:  # UNet chunks, and pix2pix's VAE-encode batches
        want = _batch_places(local, size)
        for shard in shards:
            got = _batch_places(sorted(set(shard.computed) | set(shard.frames) | {0}), size)
            assert {f: got[f] for f in shard.frames} == {f: want[f] for f in shard.frames}
            assert got[0] == want[0]  # frame 1, which every frame attends to
    if len(frames) > shard_size:
        assert len(shards) > 1


def test_a_local_model_too_big_to_send_is_refused_before_connecting(
    tiny_models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster, "MAX_SENT_MODEL_BYTES", 1000)
    job = make_job(tmp_path / "out", model=str(tiny_models["tiny"]))
    nowhere = ClusterConfig(f"127.0.0.1:{free_port()}", "t")  # never reached
    with pytest.raises(ClusterError, match="model: .* GiB.*hub id"):
        run_on_cluster(job, nowhere)


def run_in_thread(target: Any) -> tuple[threading.Thread, list]:
    outcome: list = []

    def body() -> None:
        try:
            outcome.append(target())
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, outcome


def test_actors_keep_their_models_loaded_between_jobs(head: ClusterConfig, tmp_path: Path) -> None:
    def states() -> list[tuple[int, int]]:
        described = [a.handle.describe.remote() for a in cluster.worker_actors(ray)]
        return [(d["pid"], d["model_loads"]) for d in ray.get(described, timeout=60)]

    run_on_cluster(make_job(tmp_path / "a", write_mp4=False), head)
    before = states()
    run_on_cluster(make_job(tmp_path / "b", seed=3, write_mp4=False), head)
    assert states() == before  # the same processes, not one model loaded again


def test_two_concurrent_jobs_do_not_mix_their_frames(
    head: ClusterConfig, cache: ModelCache, tmp_path: Path
) -> None:
    jobs = [make_job(tmp_path / f"remote{s}", seed=s, write_mp4=False) for s in (5, 6)]
    runs = [run_in_thread(lambda j=j: run_on_cluster(j, head)) for j in jobs]
    for seed in (5, 6):
        run_job(make_job(tmp_path / f"local{seed}", seed=seed, write_mp4=False), cache)
    for thread, outcome in runs:
        thread.join(120)
        assert outcome and not isinstance(outcome[0], BaseException), outcome
    for seed in (5, 6):
        assert_same_result(tmp_path / f"local{seed}", tmp_path / f"remote{seed}")


def _long_job(out: Path, **fields: Any):
    # ~3 s a shard on this CPU: long enough to act mid-shard, short enough for the suite.
    return make_job(out, frames=16, steps=12, chunk_size=4, write_mp4=False, **fields)


def _wait_for(events: list, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(e[5] == what for e in events):
        assert time.monotonic() < deadline, f"no {what} progress in {timeout} s"
        time.sleep(0.05)


def test_cancel_stops_every_shard_within_seconds_and_leaves_nothing(
    head: ClusterConfig, tmp_path: Path
) -> None:
    progress: list[tuple] = []
    cancel = threading.Event()
    events = JobEvents(progress=lambda *a: progress.append(a), should_cancel=cancel.is_set)
    config = ClusterConfig(head.address, head.token, shard_size=8)
    thread, outcome = run_in_thread(
        lambda: run_on_cluster(_long_job(tmp_path / "out"), config, events)
    )
    _wait_for(progress, "denoising")
    cancelled_at = time.monotonic()
    cancel.set()
    thread.join(30)
    assert outcome and isinstance(outcome[0], Cancelled)
    assert time.monotonic() - cancelled_at < cluster.CANCEL_WAIT_S + 1
    assert list(tmp_path.iterdir()) == []  # no result, no staging folder
    # Both actors are free again at once: a new job is not queued behind the cancelled one.
    started = time.monotonic()
    run_on_cluster(make_job(tmp_path / "after", frames=2, write_mp4=False), head)
    assert time.monotonic() - started < 20


def test_an_unreachable_cluster_is_a_clear_error_within_15_s(
    head: ClusterConfig, tmp_path: Path
) -> None:
    config = ClusterConfig(f"127.0.0.1:{free_port()}", "token")  # nothing listens there
    for attempt in (
        lambda: cluster.cluster_info(config),
        lambda: run_on_cluster(make_job(tmp_path / "out"), config),
    ):
        started = time.monotonic()
        with pytest.raises(ClusterError, match="unreachable"):
            attempt()
        assert time.monotonic() - started < cluster.CONNECT_TIMEOUT_S
    assert not (tmp_path / "out").exists()
    assert cluster.cluster_info(head)["cpus"] == 2  # the working connection was kept


def test_a_non_loopback_address_without_a_token_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", cluster.ENV_TOKEN):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ClusterError, match="non-loopback address without a token"):
        run_on_cluster(make_job(tmp_path / "out"), ClusterConfig("10.20.30.40:6379"))
    assert not (tmp_path / "out").exists()
    cluster.check_config(ClusterConfig("127.0.0.1:6379"))  # loopback: Ray's own token file


def test_shard_size_comes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The add-on's Frames per Shard reaches the worker as $T2VZ_CLUSTER_SHARD_SIZE; a
    flag's value wins, and a bad value is refused naming the variable and the value."""
    monkeypatch.setenv(cluster.ENV_ADDRESS, "127.0.0.1:6379")
    monkeypatch.delenv(cluster.ENV_SHARD_SIZE, raising=False)
    assert cluster.config_from_env(None).shard_size is None
    monkeypatch.setenv(cluster.ENV_SHARD_SIZE, "16")
    assert cluster.config_from_env(None).shard_size == 16
    assert cluster.config_from_env(None, shard_size=4).shard_size == 4
    for bad in ("0", "-3", "many", "2.5"):
        monkeypatch.setenv(cluster.ENV_SHARD_SIZE, bad)
        with pytest.raises(ClusterError, match=f"T2VZ_CLUSTER_SHARD_SIZE.*{bad!r}"):
            cluster.config_from_env(None)


def test_serve_with_a_bad_shard_size_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from backend.service.cli import main

    monkeypatch.setenv(cluster.ENV_ADDRESS, "127.0.0.1:6379")
    monkeypatch.setenv(cluster.ENV_SHARD_SIZE, "many")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "T2VZ_CLUSTER_SHARD_SIZE" in err[0] and "'many'" in err[0]


def test_bad_inputs_fail_before_dispatch_with_the_local_message(
    head: ClusterConfig, cache: ModelCache, tmp_path: Path
) -> None:
    spec = {"model": "builtin:tiny-controlnet", "control": str(tmp_path / "missing")}
    fields = {"mode": "controlnet", "controlnets": [spec]}
    with pytest.raises(VideoInputError) as local:
        run_job(make_job(tmp_path / "a", **fields), cache)
    # An unreachable address: had anything been dispatched, the error would be the cluster's.
    with pytest.raises(VideoInputError) as remote:
        run_on_cluster(
            make_job(tmp_path / "a", **fields), ClusterConfig(f"127.0.0.1:{free_port()}", "t")
        )
    assert str(remote.value) == str(local.value)


def test_a_model_the_workers_cannot_load_names_the_worker_host(
    head: ClusterConfig, tmp_path: Path
) -> None:
    job = make_job(tmp_path / "out", model="builtin:no-such-model")
    with pytest.raises(ClusterError) as failure:
        run_on_cluster(job, head)
    assert f"worker {socket.gethostname()}" in str(failure.value)
    assert "no-such-model" in str(failure.value)
    assert not (tmp_path / "out").exists()


def test_generate_cluster_on_the_command_line(
    head: ClusterConfig, cache: ModelCache, run_backend: Any, tmp_path: Path
) -> None:
    run_job(make_job(tmp_path / "local", frames=4, write_mp4=False), cache)
    args = ["generate", "--prompt", "a cat", "--model", "builtin:tiny", "--frames", "4"]
    args += ["--width", "64", "--height", "64", "--steps", "3", "--chunk-size", "3"]
    args += ["--device", "cpu", "--dtype", "float32", "--no-mp4", "--save-latents"]
    args += ["--cluster", head.address, "--cluster-token", head.token, "--shard-size", "2"]
    done = run_backend(*args, "--out", str(tmp_path / "remote"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_result(tmp_path / "local", tmp_path / "remote")
    refused = run_backend(*args[:-6], "--cluster", "10.9.8.7:6379", "--out", str(tmp_path / "x"))
    assert refused.returncode == 1 and "without a token" in refused.stderr


def test_the_worker_reports_the_cluster_and_runs_a_request_there(
    head: ClusterConfig, cache: ModelCache, backend_env: dict, tmp_path: Path
) -> None:
    import queue

    from backend.protocol import decode_message, encode_message

    env = dict(backend_env)
    env.update(T2VZ_CLUSTER=head.address, T2VZ_CLUSTER_TOKEN=head.token)
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend", "serve"],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    replies: queue.Queue = queue.Queue()
    threading.Thread(
        target=lambda: [replies.put(decode_message(line)) for line in proc.stdout], daemon=True
    ).start()

    def reply(request_id: str) -> dict:
        while True:
            message = replies.get(timeout=120)
            if message.get("id") == request_id and message["type"] not in (
                "accepted",
                "progress",
                "preview",
            ):
                return message

    try:
        job = make_job(tmp_path / "remote", frames=3, write_mp4=False).to_dict()
        proc.stdin.write(encode_message("cluster_info", id="c1") + "\n")
        proc.stdin.write(encode_message("generate", id="g1", job=job) + "\n")
        proc.stdin.flush()
        info = reply("c1")
        assert info["type"] == "cluster" and info["cpus"] == 2 and info["gpus"] == 0
        done = reply("g1")
        assert done["type"] == "done", done
        run_job(make_job(tmp_path / "local", frames=3, write_mp4=False), cache)
        assert_same_result(tmp_path / "local", tmp_path / "remote")
        assert "cluster" in json.loads((tmp_path / "remote" / "run.json").read_text())
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_an_actor_killed_mid_shard_is_retried_elsewhere_and_the_result_is_unchanged(
    head: ClusterConfig, cache: ModelCache, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    progress: list[tuple] = []
    config = ClusterConfig(head.address, head.token, shard_size=8)
    events = JobEvents(progress=lambda *a: progress.append(a))
    thread, outcome = run_in_thread(
        lambda: run_on_cluster(_long_job(tmp_path / "remote"), config, events)
    )
    _wait_for(progress, "denoising")
    actors = cluster.worker_actors(ray)
    pids = [ray.get(a.handle.describe.remote(), timeout=30)["pid"] for a in actors]
    os.kill(pids[0], signal.SIGKILL)  # one of the two shards loses its process
    thread.join(180)
    assert outcome and not isinstance(outcome[0], BaseException), outcome
    run_job(_long_job(tmp_path / "local"), cache)
    assert_same_result(tmp_path / "local", tmp_path / "remote")
    assert "went away" in caplog.text and "runs again on another worker" in caplog.text
