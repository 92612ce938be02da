"""Detectors: what the backend environment has (probed without importing it into Blender),
greyed-out choices in the panel, a clear refusal, and the installer's Detectors option."""

import importlib.util
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import bpy
import pytest
from conftest import BACKEND_PYTHON
from test_panels import Layout

from blender_t2vz import capabilities, jobs, operators, panels, preferences, runtime, strips

MODULES = ("controlnet_aux", "torchvision")


class EnabledLayout(Layout):
    """Also records ``prop_enum`` buttons with whether their row is enabled."""

    enabled = True

    def _child(self, *args, **kwargs) -> "EnabledLayout":
        child = EnabledLayout(self.log)
        child.enabled = self.enabled
        return child

    row = column = box = split = _child

    def prop_enum(self, data, name: str, value: str, **kwargs) -> None:
        super().prop_enum(data, name, value)
        self.log.append(("prop_enum", value, self.enabled))


@pytest.fixture
def fresh_cache():
    capabilities.forget()
    yield capabilities._cache
    capabilities.forget()


def test_probe_matches_the_backend_environment(fresh_cache, monkeypatch) -> None:
    found = capabilities.probe_modules(BACKEND_PYTHON, MODULES)
    if Path(BACKEND_PYTHON).resolve() == Path(sys.executable).resolve():
        assert found == {m: importlib.util.find_spec(m) is not None for m in MODULES}
    usable = all(found.values())
    probes = []  # each probe is a subprocess of the backend's python
    real_probe = capabilities.probe_modules

    def probe(*args, **kwargs):
        probes.append(args)
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(capabilities, "probe_modules", probe)
    assert capabilities.detector_availability(BACKEND_PYTHON) == {
        "openpose": usable,
        "depth": usable,
    }
    assert len(probes) == 1
    capabilities.detector_availability(BACKEND_PYTHON)
    assert len(probes) == 1  # cached: no second subprocess
    assert capabilities.detector_availability(None) is None
    assert capabilities.detector_availability("/no/such/python") is None


def test_probe_finds_modules_without_importing_them(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    for name in MODULES:
        package = tmp_path / "site" / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = {"PYTHONPATH": str(tmp_path / "site")}
    found = capabilities.probe_modules(BACKEND_PYTHON, [*MODULES, "t2vz_no_such_module"], env)
    assert found == {"controlnet_aux": True, "torchvision": True, "t2vz_no_such_module": False}
    assert not marker.exists()  # looked up, never imported (no torch start-up in the probe)
    with pytest.raises(capabilities.ProbeError):
        capabilities.probe_modules(tmp_path / "missing-python", MODULES)


def _control_panel(scene, image_folder: Path, detector: str):
    editor = scene.sequence_editor
    strip = strips.top_strips(editor).new_image(
        name="user images", filepath=str(image_folder / "img_1.png"), channel=1, frame_start=1
    )
    editor.active_strip = strip
    settings = scene.t2vz
    settings.mode = "controlnet"
    settings.prompt = "a dancer"
    item = settings.controlnets.add()
    item.source, item.detector = "ACTIVE_STRIP", detector
    settings.controlnet_index = 0
    return item


def _draw_controlnets() -> list:
    log: list = []
    panels.T2VZ_PT_controlnets.draw(SimpleNamespace(layout=EnabledLayout(log)), bpy.context)
    return log


def test_panel_greys_out_missing_detectors_and_says_how_to_get_them(
    scene, image_folder: Path, fresh_cache
) -> None:
    _control_panel(scene, image_folder, "canny")
    python = str(preferences.backend_python(preferences.get_prefs()))
    fresh_cache[python] = {"openpose": False, "depth": False}
    log = _draw_controlnets()
    buttons = {
        value: enabled for kind, value, *rest in log if kind == "prop_enum" for enabled in rest
    }
    assert buttons == {"none": True, "canny": True, "openpose": False, "depth": False}
    text = " ".join(entry[1] for entry in log if entry[0] == "label")
    assert "OpenPose, Depth: need controlnet_aux, torchvision" in text
    assert "Detectors" in text and "Install Backend" in text

    fresh_cache[python] = {"openpose": True, "depth": True}
    log = _draw_controlnets()
    assert all(entry[2] for entry in log if entry[0] == "prop_enum")
    assert not any("need controlnet_aux" in entry[1] for entry in log if entry[0] == "label")


def test_a_missing_detector_is_refused_before_the_job(
    scene, image_folder: Path, fresh_cache
) -> None:
    item = _control_panel(scene, image_folder, "openpose")
    python = str(preferences.backend_python(preferences.get_prefs()))
    fresh_cache[python] = {"openpose": False, "depth": True}
    with pytest.raises(jobs.JobBuildError, match="detector 'openpose' needs controlnet_aux"):
        operators.plan_from_panel(bpy.context)
    item.detector = "depth"
    job = operators.plan_from_panel(bpy.context).job
    assert job["controlnets"][0]["detector"] == "depth"


def test_install_backend_passes_the_detectors_checkbox(
    addon, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefs = preferences.get_prefs()
    calls: list[dict] = []
    monkeypatch.setattr(preferences, "online_access", lambda: True)  # off in headless bpy
    monkeypatch.setattr(runtime.INSTALLER, "start", lambda venv, **kw: calls.append(kw))
    for ticked in (True, False):
        prefs.install_detectors = ticked
        assert bpy.ops.t2vz.install_backend() == {"FINISHED"}
    assert [c["detectors"] for c in calls] == [True, False]
    log: list = []

    class Self:
        layout = Layout(log)

        def __getattr__(self, name):
            return getattr(prefs, name)

    preferences.T2VZ_Preferences.draw(Self(), bpy.context)
    assert ("prop", "install_detectors") in log


def test_installer_runs_with_detectors_and_forgets_the_probe(
    addon, tmp_path: Path, fresh_cache
) -> None:
    script = tmp_path / "install_deps.py"
    argv_file = tmp_path / "argv.txt"
    script.write_text(
        "import sys\n"
        f"open({str(argv_file)!r}, 'w').write(' '.join(sys.argv[1:]))\n"
        "print('[t2vz] done', flush=True)\n"
    )
    fresh_cache["some python"] = {"openpose": False}
    runtime.INSTALLER.start(tmp_path / "venv", torch="cpu", script=script, detectors=True)
    deadline = time.monotonic() + 30
    while runtime.INSTALLER.step() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not runtime.INSTALLER.running
    assert argv_file.read_text() == f"--venv {tmp_path / 'venv'} --torch cpu --detectors"
    assert bpy.context.window_manager.t2vz_status.install_message == "Backend installed"
    assert fresh_cache == {}  # asked again after an install
