"""Model downloads in the add-on: progress and cancel, the cache list, Allow Online Access.

The downloads run in the real backend worker through the real huggingface_hub client,
against ``fakehub.FakeHub`` on 127.0.0.1 (``HF_ENDPOINT``): never the internet. There is
no event loop in the bpy module, so the tests step the runner themselves; ESC in the
operator's modal calls ``RUNNER.cancel``, which is what the cancel test calls.
"""

import os
import time
from collections.abc import Iterator
from pathlib import Path

import bpy
import pytest
from conftest import BACKEND_PYTHON
from fakehub import FakeHub

from blender_t2vz import backend_paths, preferences, runtime

MB = 1 << 20


def test_download_status_names_model_file_bytes_and_rate() -> None:
    text = runtime.download_text(
        {"model": "owner/sd", "file": "unet/w.safetensors", "bytes_done": 1_500_000,
         "bytes_total": 24_000_000, "rate": 6_000_000.0}
    )  # fmt: skip
    assert (
        text == "Downloading owner/sd (unet/w.safetensors): 1.5 MB of 24.0 MB at 6.0 MB/s, 4 s left"
    )
    done = runtime.download_text(
        {"model": "owner/sd", "file": "", "bytes_done": 3_400_000_000,
         "bytes_total": 3_400_000_000, "rate": 1.0}
    )  # fmt: skip
    assert done == "Downloading owner/sd: 3.40 GB of 3.40 GB"


def test_online_access_off_runs_the_worker_offline(addon: object) -> None:
    prefs = bpy.context.preferences.addons["blender_t2vz"].preferences
    assert preferences.worker_env(prefs, online=False)["HF_HUB_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in preferences.worker_env(prefs, online=True)
    # The worker is keyed by its environment: switching access starts another worker.


def test_install_backend_and_downloads_refuse_without_online_access(
    addon: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert bpy.ops.t2vz.install_backend.poll() == preferences.online_access()
    monkeypatch.setattr(preferences, "online_access", lambda: False)
    assert not bpy.ops.t2vz.install_backend.poll()
    assert not bpy.ops.t2vz.model_download.poll()
    with pytest.raises(RuntimeError):  # poll failed: the installer never starts
        bpy.ops.t2vz.install_backend()
    assert not runtime.INSTALLER.running
    assert "will not run" in preferences.OFFLINE_INSTALL
    monkeypatch.setattr(preferences, "online_access", lambda: True)
    assert bpy.ops.t2vz.install_backend.poll() and bpy.ops.t2vz.model_download.poll()


def test_hub_ids_get_a_download_button_paths_do_not(tmp_path: Path) -> None:
    assert preferences.is_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert preferences.is_hub_id(" owner/fine-tune/sub/v1.safetensors ")  # one file of a repo
    assert preferences.is_hub_id("owner/fine-tune/v1.ckpt")  # the worker says how to allow it
    for name in ("builtin:tiny", "/models/sd", "~/sd.safetensors", "C:/sd", "model.ckpt",
                 "owner/name/README.md", "owner/name/"):  # fmt: skip
        assert not preferences.is_hub_id(name), name
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert not preferences.is_hub_id(os.path.relpath(tmp_path / "owner" / "name"))
    (tmp_path / "owner" / "name" / "v1.safetensors").write_bytes(b"")
    assert not preferences.is_hub_id(
        os.path.relpath(tmp_path / "owner" / "name" / "v1.safetensors")
    )


def test_the_download_button_sends_its_kind_and_the_pickle_preference(
    addon: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blender_t2vz import operators

    backend_kinds = backend_paths.load_protocol().FETCH_KINDS
    assert [item[0] for item in operators.FETCH_KIND_ITEMS] == list(backend_kinds)
    sent: list = []
    monkeypatch.setattr(preferences, "online_access", lambda: True)
    monkeypatch.setattr(preferences, "resolve_python", lambda prefs: "/py")
    monkeypatch.setattr(runtime.RUNNER, "fetch", lambda model, **kw: sent.append((model, kw)))
    prefs = bpy.context.preferences.addons["blender_t2vz"].preferences
    allow, prefs.allow_pickle = prefs.allow_pickle, True
    try:
        result = bpy.ops.t2vz.model_download(model=" owner/loras/style.safetensors ", kind="lora")
    finally:
        prefs.allow_pickle = allow
    assert result == {"FINISHED"}
    ((model, kw),) = sent
    assert model == "owner/loras/style.safetensors"
    assert (kw["kind"], kw["allow_pickle"], kw["python"]) == ("lora", True, "/py")
    with pytest.raises(RuntimeError, match=r"'owner/loras/notes.txt' is not a hub id"):
        bpy.ops.t2vz.model_download(model="owner/loras/notes.txt", kind="lora")
    assert len(sent) == 1


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    """test/big: a ControlNet-shaped repo of 24 MB random weights."""
    repo = {
        "config.json": b'{"_class_name": "ControlNetModel"}',
        "diffusion_pytorch_model.safetensors": os.urandom(24 * MB),
    }
    with FakeHub({"test/big": repo}) as server:
        yield server


def step_until(condition, timeout: float = 120.0) -> None:
    """Step the runner (as the timer would) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runtime.RUNNER.step()
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out; status: {bpy.context.window_manager.t2vz_status.message!r}")


def test_download_progress_cancel_list_and_remove(
    addon: object, hub: FakeHub, tmp_path: Path
) -> None:
    runner, status = runtime.RUNNER, bpy.context.window_manager.t2vz_status
    assert not runner.busy
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hub")}
    hub.rate = 6 * MB  # about 4 s for the weights: progress can be watched
    try:
        runner.fetch("test/big", python=BACKEND_PYTHON, env=env)
        assert runner.busy and runner.job.kind == "fetch"
        step_until(lambda: status.progress > 0.3)
        # The panel and the progress bar show which model, which file, bytes and rate.
        assert status.message.startswith(
            "Downloading test/big (diffusion_pytorch_model.safetensors): "
        )
        assert " of 25.2 MB at " in status.message and status.message.endswith(" s left")
        assert status.state == "RUNNING"

        assert runner.cancel()  # what ESC and the Cancel button do
        step_until(lambda: not runner.busy, timeout=30)
        assert runner.outcome.level == "INFO" and runner.outcome.message == "Cancelled"
        assert hub.bytes_sent < 24 * MB

        hub.rate = None
        runner.fetch("test/big", python=BACKEND_PYTHON, env=env)
        step_until(lambda: not runner.busy)
        assert runner.outcome.message == "Downloaded test/big", runner.outcome.message
        assert status.progress == 1.0
        # The list of downloaded models refreshes itself after a download.
        step_until(lambda: status.cache_listed and not runner.cache_requests)
        listed = [(m.model, m.size, m.complete) for m in status.cached_models]
        assert listed == [("test/big", float(24 * MB + 34), True)]
        assert status.cache_dir == str(tmp_path / "hub")

        runner.remove_model("test/big", python=BACKEND_PYTHON, env=env)
        step_until(lambda: not runner.cache_requests)
        assert len(status.cached_models) == 0
        assert status.cache_message == "Removed test/big (25.2 MB freed)"
        assert not (tmp_path / "hub" / "models--test--big").exists()
    finally:
        runner.job = None
        runner.stop_worker(timeout=5.0)
        status.cache_listed = False
        status.cached_models.clear()
        status.cache_message = ""


def test_preferences_show_downloads_sizes_and_the_offline_switch(
    addon: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_panels import Layout

    prefs = bpy.context.preferences.addons["blender_t2vz"].preferences
    status = bpy.context.window_manager.t2vz_status
    log: list = []

    class Self:
        layout = Layout(log)

        def __getattr__(self, name):
            return getattr(prefs, name)

    model, prefs.model = prefs.model, "owner/base-model"
    item = status.cached_models.add()
    item.model, item.size, item.complete = "owner/base-model", 3.4e9, True
    status.cache_listed = True
    monkeypatch.setattr(preferences, "online_access", lambda: False)
    try:
        preferences.T2VZ_Preferences.draw(Self(), bpy.context)
    finally:
        prefs.model = model
        status.cached_models.clear()
        status.cache_listed = False
    operators = [name for kind, name in log if kind == "operator"]
    labels = [name for kind, name in log if kind == "label"]
    # One download button: the hub id (the other models are built-in test models).
    assert operators.count("t2vz.model_download") == 1
    assert "t2vz.model_remove" in operators and "t2vz.models_refresh" in operators
    assert "owner/base-model" in labels and "3.40 GB" in labels
    assert preferences.OFFLINE_INSTALL in labels and preferences.OFFLINE_WORKER in labels
