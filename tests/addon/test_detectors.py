"""Detectors: what the backend environment has (probed without importing it into Blender),
greyed-out choices in the panel, a clear refusal, the controlnet-aux extras only with
pickled weights allowed, Preview Detector, the installer's Detectors option, and the whole
path of a movie strip through OpenPose into a ControlNet job."""

import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import bpy
import pytest
from conftest import BACKEND_PYTHON, ROOT
from test_panels import Layout

from blender_t2vz import (
    backend_paths,
    capabilities,
    jobs,
    operators,
    panels,
    preferences,
    runtime,
    strips,
    worker_client,
)

MODULES = ("scipy", "controlnet_aux", "torchvision")
EXTRAS = ("hed", "lineart", "mlsd")
FAKE = str(Path(__file__).with_name("fake_worker.py"))


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
    # Not resolved: a venv's python is a link to the base interpreter, which another
    # Blender's venv (T2VZ_TEST_BACKEND_PYTHON) shares.
    if Path(BACKEND_PYTHON).absolute() == Path(sys.executable).absolute():
        assert found == {m: importlib.util.find_spec(m) is not None for m in MODULES}
    aux = found["controlnet_aux"] and found["torchvision"]
    probes = []  # each probe is a subprocess of the backend's python
    real_probe = capabilities.probe_modules

    def probe(*args, **kwargs):
        probes.append(args)
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(capabilities, "probe_modules", probe)
    assert capabilities.detector_availability(BACKEND_PYTHON) == {
        "openpose": found["scipy"],
        **{name: aux for name in EXTRAS},
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
    assert found == {
        "scipy": True,
        "controlnet_aux": True,
        "torchvision": True,
        "t2vz_no_such_module": False,
    }
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
    prefs = preferences.get_prefs()
    prefs.allow_pickle = True
    python = str(preferences.backend_python(prefs))
    fresh_cache[python] = {"openpose": False, **{name: False for name in EXTRAS}}
    log = _draw_controlnets()
    buttons = {
        value: enabled for kind, value, *rest in log if kind == "prop_enum" for enabled in rest
    }
    assert buttons == {
        "none": True,
        "canny": True,
        "openpose": False,
        "depth": True,  # Depth Anything needs only the requirements
        **{name: False for name in EXTRAS},
    }
    text = " ".join(entry[1] for entry in log if entry[0] == "label")
    assert "OpenPose: need scipy" in text
    assert "HED, Lineart, MLSD: need controlnet_aux, torchvision" in text
    assert "Detectors" in text and "Install Backend" in text

    fresh_cache[python] = {"openpose": True, **{name: True for name in EXTRAS}}
    log = _draw_controlnets()
    assert all(entry[2] for entry in log if entry[0] == "prop_enum")
    assert not any("need " in entry[1] for entry in log if entry[0] == "label")
    assert ("operator", "t2vz.detector_preview") in [entry[:2] for entry in log]
    prefs.allow_pickle = False


def test_panel_says_why_the_controlnet_aux_detectors_are_off(
    scene, image_folder: Path, fresh_cache
) -> None:
    item = _control_panel(scene, image_folder, "canny")
    prefs = preferences.get_prefs()
    python = str(preferences.backend_python(prefs))
    fresh_cache[python] = {"openpose": True, **{name: True for name in EXTRAS}}
    prefs.allow_pickle = False
    log = _draw_controlnets()
    buttons = {entry[1]: entry[2] for entry in log if entry[0] == "prop_enum"}
    assert [name for name in EXTRAS if buttons[name]] == []
    assert buttons["openpose"] and buttons["depth"]
    text = " ".join(entry[1] for entry in log if entry[0] == "label")
    assert "HED, Lineart, MLSD comes from controlnet-aux" in text and "pickled" in text
    assert "Allow Pickled Weights" in text
    item.detector = "hed"  # chosen before: refused with the reason
    with pytest.raises(jobs.JobBuildError, match="'hed' comes from controlnet-aux.*pickled"):
        operators.plan_from_panel(bpy.context)
    prefs.allow_pickle = True
    try:
        with pytest.raises(jobs.JobBuildError, match="set the Model, e.g. .*softedge"):
            operators.plan_from_panel(bpy.context)  # no canny ControlNet for HED images
        item.model = "builtin:tiny-controlnet"
        job = operators.plan_from_panel(bpy.context).job
        assert job["controlnets"][0]["detector"] == "hed"
        log = _draw_controlnets()
        assert all(entry[2] for entry in log if entry[0] == "prop_enum")
        assert not any("pickled" in entry[1] for entry in log if entry[0] == "label")
    finally:
        prefs.allow_pickle = False


def test_a_missing_detector_is_refused_before_the_job(
    scene, image_folder: Path, fresh_cache
) -> None:
    item = _control_panel(scene, image_folder, "openpose")
    python = str(preferences.backend_python(preferences.get_prefs()))
    fresh_cache[python] = {"openpose": False}
    with pytest.raises(jobs.JobBuildError, match="detector 'openpose' needs scipy"):
        operators.plan_from_panel(bpy.context)
    item.detector = "depth"
    job = operators.plan_from_panel(bpy.context).job
    assert job["controlnets"][0]["detector"] == "depth"


def test_install_backend_passes_the_detectors_and_ray_checkboxes(
    addon, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefs = preferences.get_prefs()
    calls: list[dict] = []
    monkeypatch.setattr(preferences, "online_access", lambda: True)  # off in headless bpy
    monkeypatch.setattr(runtime.INSTALLER, "start", lambda venv, **kw: calls.append(kw))
    for detectors, cluster in ((True, False), (False, True)):
        prefs.install_detectors, prefs.install_cluster = detectors, cluster
        assert bpy.ops.t2vz.install_backend() == {"FINISHED"}
    prefs.install_cluster = False
    assert [(c["detectors"], c["cluster"]) for c in calls] == [(True, False), (False, True)]
    log: list = []

    class Self:
        layout = Layout(log)

        def __getattr__(self, name):
            return getattr(prefs, name)

    preferences.T2VZ_Preferences.draw(Self(), bpy.context)
    assert ("prop", "install_detectors") in log and ("prop", "install_cluster") in log


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
    runtime.INSTALLER.start(
        tmp_path / "venv", torch="cpu", script=script, detectors=True, cluster=True
    )
    deadline = time.monotonic() + 30
    while runtime.INSTALLER.step() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not runtime.INSTALLER.running
    assert argv_file.read_text() == f"--venv {tmp_path / 'venv'} --torch cpu --detectors --cluster"
    assert bpy.context.window_manager.t2vz_status.install_message == "Backend installed"
    assert fresh_cache == {}  # asked again after an install


def test_install_backend_installs_what_openpose_and_depth_need() -> None:
    """scipy (VitPose's image processor) comes with the backend requirements that Install
    Backend installs; only the controlnet-aux extras wait for the Detectors option."""
    protocol = backend_paths.load_protocol()
    requirements = (ROOT / "backend" / "requirements.txt").read_text().splitlines()
    names = {line.split("<")[0].split(">")[0].split("=")[0].strip() for line in requirements}
    for detector in protocol.MODEL_DETECTORS:
        assert set(protocol.DETECTOR_MODULES.get(detector, ())) <= names, detector
    assert "scipy" in protocol.DETECTOR_MODULES["openpose"]
    assert "controlnet-aux" not in names  # an extra, never a requirement


# --------------------------------------------------------------------------- preview


@pytest.fixture
def fake_runner(monkeypatch: pytest.MonkeyPatch) -> runtime.Runner:
    """The add-on's runner, talking to the scripted fake worker."""
    monkeypatch.setattr(
        runtime, "WorkerClient", functools.partial(worker_client.WorkerClient, args=(FAKE,))
    )
    runner = runtime.RUNNER
    runner.stop_worker()
    yield runner
    runner.detector_requests.clear()
    runner.stop_worker(timeout=2.0)


def _step_until(runner: runtime.Runner, done, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        runner.step()
        time.sleep(0.02)


def test_preview_detector_asks_the_worker_for_the_current_frame(
    scene, image_folder: Path, fresh_cache, fake_runner: runtime.Runner, monkeypatch
) -> None:
    item = _control_panel(scene, image_folder, "depth")
    strip = scene.sequence_editor.active_strip
    for i in range(2, 7):
        strip.elements.append(f"img_{i}.png")
    strip.frame_start = 10
    scene.frame_current = 12  # the strip's third frame
    scene.t2vz.fit = "pad"
    replies: list[dict] = []
    apply = runtime.Runner._apply_detector_reply
    monkeypatch.setattr(
        runtime.Runner, "_apply_detector_reply", lambda r, m: (replies.append(m), apply(r, m))
    )
    status = bpy.context.window_manager.t2vz_status
    assert bpy.ops.t2vz.detector_preview() == {"FINISHED"}
    assert status.message == "Previewing the depth detector..."
    (request_id,) = fake_runner.detector_requests
    _step_until(fake_runner, lambda: not fake_runner.detector_requests)
    assert [m["type"] for m in replies] == ["download", "detected"]
    assert Path(status.preview_path).name == f"t2vz-fake-detected-{request_id}.png"
    assert fake_runner.preview_key == status.preview_path
    assert status.message == "Detector preview: depth"
    # What the worker got: the strip's frames as a job reads them, the strip's third frame,
    # the job's size and fit, and no allow_pickle.
    sent = replies[-1]["request"]
    assert sent["frame"] == 2 and sent["detector"] == "depth" and sent["fit"] == "pad"
    assert (sent["width"], sent["height"]) == tuple(scene.t2vz.size(scene))
    assert "allow_pickle" not in sent
    paths = sorted(Path(sent["control"]["path"]).iterdir())
    assert [p.resolve() for p in paths] == sorted(image_folder.glob("img_*.png"))
    scene.frame_current = 9  # before the strip
    with pytest.raises(ValueError, match="frame 9 is not on strip"):
        operators.detector_preview_request(bpy.context)
    item.detector = "none"
    assert not operators.T2VZ_OT_detector_preview.poll(bpy.context)


def test_preview_detector_shows_the_workers_refusal(
    scene, image_folder: Path, fresh_cache, fake_runner: runtime.Runner
) -> None:
    _control_panel(scene, image_folder, "mlsd")
    python = str(preferences.backend_python(preferences.get_prefs()))
    fresh_cache[python] = {name: True for name in ("openpose", *EXTRAS)}
    prefs = preferences.get_prefs()
    with pytest.raises(RuntimeError, match="'mlsd' comes from controlnet-aux.*pickled"):
        bpy.ops.t2vz.detector_preview()  # refused here: pickled weights are not allowed
    assert not fake_runner.detector_requests
    prefs.allow_pickle = True
    try:
        request_id = fake_runner.preview_detector(
            operators.detector_preview_request(bpy.context), python=BACKEND_PYTHON
        )  # as if the worker refused anyway: its error reaches the panel
        _step_until(fake_runner, lambda: request_id not in fake_runner.detector_requests)
    finally:
        prefs.allow_pickle = False
    status = bpy.context.window_manager.t2vz_status
    assert status.error.startswith("Detector preview failed: DetectorUnavailableError")


# --------------------------------------------------------------------------- the whole path


def _cache_repo(hub_cache: Path, repo: str, folder: Path) -> None:
    """Put ``folder``'s files into ``hub_cache`` as huggingface_hub keeps hub repo ``repo``
    (blobs, a snapshot of links to them, refs/main)."""
    root = hub_cache / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    for path in folder.iterdir():
        data = path.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)


@pytest.mark.slow
def test_a_movie_strip_through_openpose_into_a_controlnet_job(
    fresh_scene, tmp_path: Path, fresh_cache
) -> None:
    """The default OpenPose weights (tiny stand-ins in the model cache, offline) turn a movie
    strip into pose images for a ControlNet job through the real backend."""
    from test_movie_frames import write_movie

    built = tmp_path / "detectors"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = ROOT / "tests" / "tiny_detectors.py"
    subprocess.run([BACKEND_PYTHON, str(script), str(built)], check=True, env=env, timeout=300)
    defaults = backend_paths.load_protocol().DETECTOR_MODELS["openpose"]
    for role, repo in defaults.items():
        _cache_repo(tmp_path / "hf" / "hub", repo, built / role)
    prefs = preferences.get_prefs()
    prefs.models_dir = str(tmp_path / "hf")
    try:
        movie = write_movie(tmp_path, "MPEG4", ".mp4", 24)
        editor = fresh_scene.sequence_editor
        strip = strips.top_strips(editor).new_movie(
            name="dancer", filepath=str(movie), channel=1, frame_start=1
        )
        strips.select_only(editor, strip)
        settings = fresh_scene.t2vz
        settings.mode, settings.prompt = "controlnet", "a robot dancing"
        item = settings.controlnets.add()
        item.source, item.detector = "ACTIVE_STRIP", "openpose"
        assert bpy.ops.t2vz.generate() == {"FINISHED"}
        outcome = runtime.RUNNER.wait(240.0)
        assert outcome is not None and outcome.level == "INFO", outcome
    finally:
        prefs.models_dir = ""
    (result,) = [s for s in strips.top_strips(editor) if strips.stored_job(s)]
    job = json.loads(Path(bpy.path.abspath(result.directory), "job.json").read_text())
    (controlnet,) = job["controlnets"]
    assert controlnet["detector"] == "openpose" and controlnet["detector_models"] == defaults
    assert Path(bpy.path.abspath(result.directory), "frame_00003.png").is_file()


def test_the_status_line_counts_detected_control_frames() -> None:
    job = SimpleNamespace(job={"frames": 8, "steps": 10}, step_shown=0)
    message = {"stage": "detecting", "step": 3, "total": 8, "fraction": 0.0}
    assert runtime.progress_text(job, message) == "Detecting control frames: 3 of 8"
    assert job.step_shown == 0  # detection is not a denoising step
