"""The preferences' Ray cluster: the address check and Test Connection.

Jobs reach the cluster through the worker: ``preferences.worker_env`` gives it
T2VZ_CLUSTER and T2VZ_CLUSTER_TOKEN, and ``python -m backend serve`` sends every job's
frames there. Test Connection asks a worker of its own (the same protocol, a
``cluster_info`` request) on its reader thread; a timer on Blender's main thread only
reads the answer, so Blender never waits on the network (the backend answers or gives up
within 15 s).
"""

from __future__ import annotations

import ipaddress
import time
import uuid
from typing import Any

import bpy

from . import preferences
from .worker_client import EXITED, WorkerClient, WorkerError

# The worker starts (imports torch, about 8 s), then the backend gives the cluster 15 s.
TEST_TIMEOUT = 90.0
POLL_INTERVAL = 0.25

# What the last Test Connection found, shown under the button (one line).
STATE: dict[str, Any] = {"message": "", "error": False, "probe": None}


def cluster_problem(address: str, token: str) -> str:
    """Why this address cannot be used as it is ("" when it can): not host:port, or a
    machine other than this one without a token (whoever reaches a cluster runs code on it)."""
    address = address.strip()
    if not address:
        return ""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"Cluster address must be host:port, got {address!r}"
    if not token.strip() and not _is_loopback(host):
        return (
            f"{host} is another machine: give the cluster's token (the head's "
            "`ray get-auth-token`); without one the backend refuses it"
        )
    return ""


def _is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def describe(reply: dict[str, Any]) -> str:
    """One line for a ``cluster`` reply: GPUs (free), CPUs and the nodes' hosts."""
    nodes = reply.get("nodes") or []
    hosts = ", ".join(str(n.get("host") or n.get("address") or "?") for n in nodes[:4])
    more = f" and {len(nodes) - 4} more" if len(nodes) > 4 else ""
    return (
        f"Connected: {reply.get('gpus', 0)} GPUs ({reply.get('free_gpus', 0)} free), "
        f"{reply.get('cpus', 0)} CPUs on {len(nodes)} nodes ({hosts}{more})"
    )


class ConnectionProbe:
    """One cluster_info request on a worker of its own, read without blocking."""

    def __init__(self, client: Any, address: str, token: str):
        self.client = client
        self.request_id = uuid.uuid4().hex[:12]
        self.deadline = time.monotonic() + TEST_TIMEOUT
        self.client.start()
        cluster = {"address": address.strip()}
        if token.strip():
            cluster["token"] = token.strip()
        self.client.send("cluster_info", id=self.request_id, cluster=cluster)

    def step(self) -> tuple[str, bool] | None:
        """(message, is_error) once answered, failed or timed out; None while waiting."""
        for message in self.client.poll():
            if message.get("id") != self.request_id:
                if message.get("type") == EXITED:
                    return self._end(f"The backend stopped: {self.client.stderr_tail(3)}", True)
                continue
            if message.get("type") == "cluster":
                return self._end(describe(message), False)
            if message.get("type") == "error":
                return self._end(f"{message.get('kind')}: {message.get('message')}", True)
        if time.monotonic() > self.deadline:
            return self._end(f"No answer from the backend in {TEST_TIMEOUT:.0f} s", True)
        return None

    def _end(self, text: str, error: bool) -> tuple[str, bool]:
        self.client.shutdown(timeout=2.0)
        return text, error


def _redraw() -> None:
    """Redraw the Preferences windows (where the answer is shown)."""
    for window in getattr(bpy.context.window_manager, "windows", []):
        for area in window.screen.areas:
            if area.type == "PREFERENCES":
                area.tag_redraw()


def poll_probe() -> float | None:
    """Timer: take the probe's answer when there is one."""
    probe = STATE.get("probe")
    if probe is None:
        return None
    outcome = probe.step()
    if outcome is None:
        return POLL_INTERVAL
    STATE["message"], STATE["error"] = outcome
    STATE["probe"] = None
    _redraw()
    return None


class T2VZ_OT_cluster_test(bpy.types.Operator):
    """Ask the cluster which GPUs it has (through the backend; Blender keeps working)"""

    bl_idname = "t2vz.cluster_test"
    bl_label = "Test Connection"
    bl_options = {"REGISTER", "INTERNAL"}

    def execute(self, context: Any) -> set[str]:
        prefs = preferences.get_prefs(context)
        problem = cluster_problem(prefs.cluster_address, prefs.cluster_token)
        if not prefs.cluster_address.strip():
            problem = "Give the cluster's address (host:port of the Ray head) first"
        if problem:
            STATE["message"], STATE["error"] = problem, True
            self.report({"ERROR"}, problem)
            return {"CANCELLED"}
        if STATE.get("probe") is not None:
            return {"CANCELLED"}  # one test at a time
        try:
            python = preferences.resolve_python(prefs)
            client = WorkerClient(python, env=preferences.worker_env(prefs))
            STATE["probe"] = ConnectionProbe(client, prefs.cluster_address, prefs.cluster_token)
        except (preferences.EnvironmentMissingError, WorkerError) as exc:
            STATE["message"], STATE["error"] = str(exc), True
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        STATE["message"], STATE["error"] = f"Asking {prefs.cluster_address.strip()}...", False
        bpy.app.timers.register(poll_probe, first_interval=POLL_INTERVAL)
        return {"FINISHED"}


def draw(layout: Any, prefs: Any) -> None:
    """The preferences' Cluster box."""
    box = layout.box()
    box.label(text="Ray Cluster (optional: run jobs on other machines' GPUs)", icon="NETWORK_DRIVE")
    box.prop(prefs, "cluster_address")
    box.prop(prefs, "cluster_token")
    box.prop(prefs, "cluster_shard_size")
    problem = cluster_problem(prefs.cluster_address, prefs.cluster_token)
    if problem:
        box.label(text=problem, icon="ERROR")
    row = box.row()
    row.enabled = STATE.get("probe") is None
    row.operator(T2VZ_OT_cluster_test.bl_idname, icon="LINKED")
    if STATE["message"]:
        box.label(text=STATE["message"], icon="ERROR" if STATE["error"] else "INFO")


def register() -> None:
    """Register the Test Connection operator."""
    bpy.utils.register_class(T2VZ_OT_cluster_test)


def unregister() -> None:
    """Unregister it (and drop a test still waiting)."""
    probe = STATE.get("probe")
    if probe is not None:
        probe.client.kill()
        STATE["probe"] = None
    if bpy.app.timers.is_registered(poll_probe):
        bpy.app.timers.unregister(poll_probe)
    bpy.utils.unregister_class(T2VZ_OT_cluster_test)
