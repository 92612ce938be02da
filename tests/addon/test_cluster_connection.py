"""blender_t2vz/cluster_connection.py: the preferences' Ray cluster and Test Connection.

Test Connection runs the real backend worker (a ``cluster_info`` request); there is no
event loop in the bpy module, so the tests call the timer function themselves.
"""

import socket
import time

import bpy
import pytest

from blender_t2vz import cluster_connection, preferences


@pytest.mark.parametrize(
    ("address", "token", "problem"),
    [
        ("", "", ""),  # no cluster: jobs run here
        ("127.0.0.1:6379", "", ""),  # this machine: Ray's own token file may serve
        ("localhost:6379", "", ""),
        ("10.0.0.5:6379", "", "give the cluster's token"),
        ("gpu-box.lan:6379", "", "give the cluster's token"),
        ("gpu-box.lan:6379", "tok", ""),
        ("gpu-box.lan", "tok", "host:port"),
        ("gpu-box.lan:99999", "tok", "host:port"),
    ],
)
def test_an_address_without_a_token_is_refused_unless_it_is_this_machine(
    address: str, token: str, problem: str
) -> None:
    found = cluster_connection.cluster_problem(address, token)
    assert (problem in found) if problem else found == ""


def test_the_worker_gets_the_cluster_from_the_preferences(addon: object) -> None:
    prefs = bpy.context.preferences.addons["blender_t2vz"].preferences
    try:
        assert "T2VZ_CLUSTER" not in preferences.worker_env(prefs)
        prefs.cluster_address = " 10.0.0.5:6379 "
        prefs.cluster_token = "secret"
        env = preferences.worker_env(prefs)
        assert env["T2VZ_CLUSTER"] == "10.0.0.5:6379" and env["T2VZ_CLUSTER_TOKEN"] == "secret"
        assert "T2VZ_CLUSTER_SHARD_SIZE" not in env  # 0: automatic
        prefs.cluster_shard_size = 16
        assert preferences.worker_env(prefs)["T2VZ_CLUSTER_SHARD_SIZE"] == "16"
        prefs.cluster_address = ""
        assert "T2VZ_CLUSTER_SHARD_SIZE" not in preferences.worker_env(prefs)
    finally:
        prefs.cluster_address = prefs.cluster_token = ""
        prefs.cluster_shard_size = 0


def test_test_connection_never_blocks_and_an_unreachable_cluster_is_a_clear_error(
    addon: object,
) -> None:
    prefs = bpy.context.preferences.addons["blender_t2vz"].preferences
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prefs.cluster_address = f"127.0.0.1:{port}"
    try:
        started = time.monotonic()
        assert bpy.ops.t2vz.cluster_test() == {"FINISHED"}
        assert time.monotonic() - started < 1.0  # the request went to the worker's thread
        assert "Asking" in cluster_connection.STATE["message"]
        deadline = time.monotonic() + cluster_connection.TEST_TIMEOUT
        while cluster_connection.poll_probe() is not None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert cluster_connection.STATE["error"]
        assert "unreachable" in cluster_connection.STATE["message"]
        assert cluster_connection.STATE["probe"] is None
    finally:
        prefs.cluster_address = ""


def test_test_connection_refuses_another_machine_without_a_token(addon: object) -> None:
    prefs = bpy.context.preferences.addons["blender_t2vz"].preferences
    prefs.cluster_address = "10.0.0.5:6379"
    try:
        with pytest.raises(RuntimeError, match="token"):
            bpy.ops.t2vz.cluster_test()
        assert cluster_connection.STATE["probe"] is None  # no worker was asked
    finally:
        prefs.cluster_address = ""


def test_a_cluster_reply_reads_as_gpus_and_hosts() -> None:
    reply = {
        "gpus": 3,
        "free_gpus": 1,
        "cpus": 48,
        "nodes": [{"host": "gpu1", "gpus": 2}, {"host": "gpu2", "gpus": 1}],
    }
    assert cluster_connection.describe(reply) == (
        "Connected: 3 GPUs (1 free), 48 CPUs on 2 nodes (gpu1, gpu2)"
    )
