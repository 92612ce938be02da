"""Jobs built from panel settings and sequencer strips match the backend's schema."""

import dataclasses
import functools
import json
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import bpy
import pytest
from conftest import BACKEND_PYTHON

from blender_t2vz import backend_paths, jobs, operators, preferences, runtime, strips

PROTOCOL = backend_paths.load_protocol()


def _image_strip(scene, folder: Path, names: list[str], channel: int, start: int):
    strip = strips.top_strips(scene.sequence_editor).new_image(
        name="user images", filepath=str(folder / names[0]), channel=channel, frame_start=start
    )
    for name in names[1:]:
        strip.elements.append(name)
    return strip


@pytest.fixture(scope="module")
def movie(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-frame 64x64 mp4 at 24 fps, written by a separate process (no cv2 in Blender)."""
    path = tmp_path_factory.mktemp("movie") / "user clip.mp4"
    code = (
        "import cv2, numpy as np, sys\n"
        "w = cv2.VideoWriter(sys.argv[1], cv2.VideoWriter_fourcc(*'mp4v'), 24, (64, 64))\n"
        "[w.write(np.full((64, 64, 3), 20 * i, np.uint8)) for i in range(12)]\n"
        "w.release()\n"
    )
    subprocess.run([BACKEND_PYTHON, "-c", code, str(path)], check=True)
    return path


def test_scene_size_is_rounded_to_multiples_of_8() -> None:
    assert jobs.scene_size(100, 60) == (96, 64)
    assert jobs.scene_size(1920, 1080, 50) == (960, 544)
    assert jobs.scene_size(10, 10) == (64, 64)


def test_output_root_beside_the_blend_or_in_temp(tmp_path: Path) -> None:
    blend = tmp_path / "shots" / "a.blend"
    assert (
        jobs.resolve_output_root("//t2vz/", str(blend)) == (tmp_path / "shots" / "t2vz").resolve()
    )
    assert jobs.resolve_output_root("//", "", str(tmp_path)) == (tmp_path / "t2vz").resolve()
    assert (
        jobs.resolve_output_root("//renders", "", str(tmp_path)) == (tmp_path / "renders").resolve()
    )
    assert jobs.resolve_output_root(str(tmp_path / "x"), str(blend)) == (tmp_path / "x").resolve()


def test_unique_out_dir_never_reuses_an_existing_folder(tmp_path: Path) -> None:
    first = jobs.unique_out_dir(tmp_path, "A red fox, running!", 7)
    assert first.name == "a_red_fox_running_s7_001"
    first.mkdir()
    assert jobs.unique_out_dir(tmp_path, "A red fox, running!", 7).name.endswith("_002")


def test_pix2pix_job_from_image_strip_honours_offsets(scene, image_folder: Path) -> None:
    scene.render.resolution_x, scene.render.resolution_y = 100, 60
    names = [f"img_{i}.png" for i in range(1, 7)]
    strip = _image_strip(scene, image_folder, names, channel=2, start=10)
    strip.frame_offset_start = 2
    strip.frame_offset_end = 1
    scene.sequence_editor.active_strip = strip
    settings = scene.t2vz
    settings.mode = "pix2pix"
    settings.prompt = "make it snowy"
    settings.seed = 11
    settings.size_mode = "SCENE"  # the scene's 100x60, rounded to multiples of 8
    settings.smooth_bg = True  # left on from a text2video job: pix2pix has no smoothing
    settings.fit = "pad"

    plan = operators.plan_from_panel(bpy.context)
    job = plan.job
    assert PROTOCOL.validate_job(json.loads(json.dumps(job))).to_dict() == job
    assert job["mode"] == "pix2pix" and job["prompt"] == "make it snowy" and job["seed"] == 11
    assert job["smooth_bg"] is False and job["fit"] == "pad"
    assert job["frames"] == 3
    assert job["video"] == {"path": str(image_folder.resolve()), "start": 2, "stride": 1.0}
    assert (job["width"], job["height"]) == (96, 64)
    assert job["model"] == "builtin:tiny-pix2pix"
    assert job["fps"] == 24.0
    assert (plan.above, plan.start) == (2, 12)
    assert not Path(job["out"]).exists()
    assert Path(job["out"]).parent == Path(settings.output_dir).resolve()


def test_controlnet_job_from_movie_strip(scene, movie: Path) -> None:
    strip = strips.top_strips(scene.sequence_editor).new_movie(
        name="user movie", filepath=str(movie), channel=3, frame_start=1
    )
    strip.frame_offset_start = 3
    scene.sequence_editor.active_strip = strip
    settings = scene.t2vz
    settings.mode = "controlnet"
    settings.prompt = "a robot"
    item = settings.controlnets.add()
    item.detector = "canny"
    item.weight = 0.7

    job = operators.plan_from_panel(bpy.context).job
    assert job["frames"] == 9
    assert job["motion"] is None
    (control,) = job["controlnets"]
    assert control == {
        "model": "builtin:tiny-controlnet",
        "weight": pytest.approx(0.7),
        "detector": "canny",
        "control": {"path": str(movie.resolve()), "start": 3, "stride": 1.0},
        "config": None,  # a single-file ControlNet's configs: the shipped SD 1.5 ones
    }

    settings.match_source = False
    settings.frames = 20
    with pytest.raises(jobs.JobBuildError, match="frames: 20 is longer than the source strip"):
        operators.plan_from_panel(bpy.context)


def test_held_image_is_staged_as_a_sequence(scene, image_folder: Path) -> None:
    strip = _image_strip(scene, image_folder, ["img_4.png"], channel=1, start=1)
    strip.frame_final_duration = 4
    scene.sequence_editor.active_strip = strip
    scene.t2vz.mode = "pix2pix"
    scene.t2vz.prompt = "night"
    job = operators.plan_from_panel(bpy.context).job
    staged = Path(job["video"]["path"])
    assert staged != image_folder and job["video"]["start"] == 0
    assert sorted(p.name for p in staged.iterdir()) == [f"frame_0000{i}.png" for i in range(1, 5)]
    assert (staged / "frame_00003.png").read_bytes() == (image_folder / "img_4.png").read_bytes()
    assert sorted(p.name for p in image_folder.iterdir()) == [f"img_{i}.png" for i in range(1, 7)]


def test_bad_values_are_named() -> None:
    base = {"mode": "text2video", "prompt": "x", "width": 64, "height": 64, "steps": 2}
    with pytest.raises(jobs.JobBuildError, match="prompt"):
        jobs.build_job({**base, "prompt": " "}, out="/tmp/o", fps=24, defaults={"model": "m"})
    with pytest.raises(jobs.JobBuildError, match="width: must be a multiple of 8, got 100"):
        jobs.build_job({**base, "width": 100}, out="/tmp/o", fps=24, defaults={"model": "m"})
    with pytest.raises(ValueError, match="guidance"):
        jobs.build_job({**base, "guidance": -1.0}, out="/tmp/o", fps=24, defaults={"model": "m"})
    with pytest.raises(jobs.JobBuildError, match="controlnets: add at least one"):
        jobs.build_job(
            {**base, "mode": "controlnet"},
            out="/tmp/o",
            fps=24,
            source_frames=4,
            defaults={"model": "m"},
        )


def test_rebuild_keeps_inputs_and_takes_panel_changes() -> None:
    stored = jobs.build_job(
        {"mode": "pix2pix", "prompt": "snow", "width": 64, "height": 64, "steps": 3, "seed": 1},
        out="/tmp/old",
        fps=24,
        defaults={"pix2pix_model": "builtin:tiny-pix2pix"},
        source_frames=5,
        video={"path": "/clips/a.mp4", "start": 4, "stride": 2.0},
    )
    panel = {"prompt": "", "seed": 9, "steps": 4, "model": "", "frames": 99, "smooth_bg": True}
    changed = jobs.rebuild_job(stored, panel, out="/tmp/new")
    assert changed["seed"] == 9 and changed["steps"] == 4
    assert changed["smooth_bg"] is False  # the panel's smoothing is for text2video/controlnet
    assert changed["prompt"] == "snow" and changed["model"] == "builtin:tiny-pix2pix"
    assert changed["video"] == stored["video"] and changed["frames"] == 5
    assert changed["out"] == "/tmp/new"


def test_missing_environment_says_what_to_click(scene) -> None:
    prefs = bpy.context.preferences.addons["blender_t2vz"].preferences
    old = prefs.python_path
    prefs.python_path = "/nonexistent/t2vz/bin/python"
    scene.t2vz.prompt = "a cat"
    try:
        with pytest.raises(RuntimeError) as info:
            bpy.ops.t2vz.generate()
    finally:
        prefs.python_path = old
    text = str(info.value)
    assert "Backend Python not found: /nonexistent/t2vz/bin/python" in text
    assert "Install Backend" in text and "Traceback" not in text
    assert not runtime.RUNNER.busy


def test_generate_poll_explains_a_missing_source(scene) -> None:
    scene.t2vz.mode = "pix2pix"
    scene.t2vz.prompt = "snow"
    assert not bpy.ops.t2vz.generate.poll()
    with pytest.raises(RuntimeError, match="Make a movie or image strip active"):
        bpy.ops.t2vz.generate()


def test_scene_control_hook_supplies_the_control(scene, monkeypatch, tmp_path: Path) -> None:
    calls = []

    def render_control(context, item, start, frames, width, height, folder):
        calls.append((item.scene_pass, start, frames, width, height))
        return {"path": str(tmp_path / "depth"), "start": 0, "stride": 1.0}

    fake = SimpleNamespace(render_control=render_control)
    monkeypatch.setattr(operators, "_scene_control", lambda: fake)
    scene.frame_current = 5
    settings = scene.t2vz
    settings.mode = "controlnet"
    settings.prompt = "a dancer"
    settings.frames = 4
    item = settings.controlnets.add()
    item.source = "SCENE"
    item.scene_pass = "DEPTH"
    plan = operators.plan_from_panel(bpy.context)
    assert calls == [("DEPTH", 5, 4, 64, 64)]
    assert plan.job["controlnets"][0]["detector"] == "none"  # a rendered depth pass: no detector
    assert plan.job["controlnets"][0]["control"]["path"] == str(tmp_path / "depth")
    assert (plan.above, plan.start, plan.job["frames"]) == (0, 5, 4)


def test_install_button_runs_the_installer_in_the_background(
    addon, monkeypatch, tmp_path: Path
) -> None:
    script = tmp_path / "install_deps.py"
    # Each step waits until the test has seen its line (a file named after it appears):
    # with fixed pauses, a test held up for one pause took steps 2 and 3 in one step()
    # and never saw step 2.
    script.write_text(
        "import os, sys, time\n"
        "open(sys.argv[0] + '.args', 'w').write(' '.join(sys.argv[1:]))\n"
        "for i in range(3):\n"
        "    print(f'[t2vz] step {i + 1}/3', flush=True)\n"
        "    print('pip noise', flush=True)\n"
        "    deadline = time.monotonic() + 60\n"
        "    while not os.path.exists(f'{sys.argv[0]}.seen-{i + 1}'):\n"
        "        if time.monotonic() > deadline:\n"
        "            sys.exit(f'step {i + 1} was never seen')\n"
        "        time.sleep(0.01)\n"
        "sys.exit(int(sys.argv[-1] == 'cpu'))\n"
    )
    monkeypatch.setattr(backend_paths, "install_script", lambda: script)
    monkeypatch.setattr(preferences, "online_access", lambda: True)  # off in headless bpy
    status = bpy.context.window_manager.t2vz_status

    def step_until_done() -> set[str]:
        """Step the installer until it ends; the status lines it showed on the way."""
        messages = set()
        deadline = time.monotonic() + 120
        while runtime.INSTALLER.running and time.monotonic() < deadline:
            runtime.step()
            messages.add(status.install_message)
            if status.install_message.startswith("step "):
                Path(f"{script}.seen-{status.install_message[5]}").touch()
            time.sleep(0.05)
        for seen in tmp_path.glob("install_deps.py.seen-*"):
            seen.unlink()
        return messages

    bpy.ops.t2vz.install_backend()
    assert runtime.INSTALLER.running and status.install_running
    messages = step_until_done()
    assert not status.install_running
    assert "step 2/3" in messages and not any("pip" in m for m in messages)
    assert status.install_message == "Backend installed" and not status.install_error
    args = (tmp_path / "install_deps.py.args").read_text().split()
    assert args[0] == "--venv" and Path(args[1]).name == ".venv" and args[2:] == ["--torch", "auto"]

    # A failing installer is reported, not raised.
    prefs = bpy.context.preferences.addons["blender_t2vz"].preferences
    prefs.torch_variant = "cpu"
    try:
        bpy.ops.t2vz.install_backend()
        step_until_done()
    finally:
        prefs.torch_variant = "auto"
    assert status.install_error.startswith("Install failed (exit code 1)")


def test_broken_environment_is_reported_not_raised(scene, tmp_path: Path) -> None:
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n"
    )
    fake_python.chmod(0o755)
    prefs = bpy.context.preferences.addons["blender_t2vz"].preferences
    old = prefs.python_path
    prefs.python_path = str(fake_python)
    scene.t2vz.prompt = "a cat"
    try:
        # The worker may die before or after the job is written to it: the operator or
        # the runner reports it, with the worker's last words and what to do.
        try:
            assert bpy.ops.t2vz.generate() == {"FINISHED"}
            outcome = runtime.RUNNER.wait(30)
            assert outcome is not None and outcome.level == "ERROR"
            message = outcome.message
            assert bpy.context.window_manager.t2vz_status.error == message
        except RuntimeError as exc:
            message = str(exc)
    finally:
        prefs.python_path = old
    assert "backend failed to start (exit code 1): ModuleNotFoundError" in message
    assert "Install Backend" in message
    assert not runtime.RUNNER.worker_alive and not runtime.RUNNER.busy
    assert not Path(scene.t2vz.output_dir).exists()


# ---------------------------------------------------------------- plain-value rules of jobs.py

BASE = {"mode": "text2video", "prompt": "a cat", "width": 64, "height": 64, "steps": 2}
MODELS = {"model": "base", "pix2pix_model": "p2p"}
CLIP = {"path": "/clips/a.mp4", "start": 0, "stride": 1.0}


def test_output_root_defaults_trims_and_expands_home(tmp_path: Path, monkeypatch) -> None:
    blend = str(tmp_path / "shots" / "a.blend")
    shots = tmp_path / "shots"
    # An empty field means the default, a t2vz folder beside the .blend.
    assert jobs.resolve_output_root("", blend) == (shots / "t2vz").resolve()
    assert jobs.resolve_output_root("  //renders  ", blend) == (shots / "renders").resolve()
    # Unsaved: "//" alone (or with only separators) names a t2vz folder in the temp folder.
    assert jobs.resolve_output_root("//\\", "", str(tmp_path)) == (tmp_path / "t2vz").resolve()
    assert jobs.resolve_output_root("//X", "", str(tmp_path)) == (tmp_path / "X").resolve()
    monkeypatch.setattr(jobs.tempfile, "gettempdir", lambda: str(tmp_path / "sys_tmp"))
    assert jobs.resolve_output_root("//", "") == (tmp_path / "sys_tmp" / "t2vz").resolve()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert jobs.resolve_output_root("~/clips", blend) == (tmp_path / "home" / "clips").resolve()


def test_slug_is_short_lowercase_and_never_empty() -> None:
    assert jobs.slug("Xenon  LAMP!") == "xenon_lamp"
    assert jobs.slug("!!!") == "t2vz"
    assert jobs.slug("(a) dog.") == "a_dog"  # no separator at either end
    assert jobs.slug("a" * 50) == "a" * 40
    # Cut at 40 characters, a separator left at the end is dropped.
    assert jobs.slug("b" * 39 + " c") == "b" * 39
    assert jobs.slug("abcdef", limit=3) == "abc"


def test_strip_name_collapses_spaces_and_cuts_whole_characters() -> None:
    assert jobs.strip_name("  a   red\tfox \n") == "a red fox"
    assert jobs.strip_name(" \t ") == "T2VZ"
    # 60 bytes at most (Blender names hold 63): a 2-byte character cut in half is dropped.
    name = jobs.strip_name("a" + "é" * 40)
    assert name == "a" + "é" * 29 and len(name.encode("utf-8")) == 59
    assert jobs.strip_name("x" * 70) == "x" * 60


def test_a_job_from_only_a_prompt_takes_the_backend_defaults() -> None:
    """Settings the panel leaves out get the backend schema's defaults (512 px: SD 1.5)."""
    job = jobs.build_job({"prompt": "a cat"}, out="/tmp/o", fps=12.5, defaults=MODELS)
    defaults = {f.name: f.default for f in dataclasses.fields(PROTOCOL.Job)}
    same = (
        "mode", "negative_prompt", "frames", "fit", "steps", "guidance", "seed", "chunk_size",
        "smooth_bg", "smooth_alpha", "device", "dtype", "compile",
    )  # fmt: skip
    assert {k: job[k] for k in same} == {k: defaults[k] for k in same}
    assert (job["width"], job["height"]) == (512, 512)
    assert job["write_mp4"] is False  # as the panel's "Also Write MP4", off by default
    assert job["motion"] == list(PROTOCOL.DEFAULT_MOTION)
    assert job["model"] == "base" and job["fps"] == 12.5 and job["out"] == "/tmp/o"
    assert job["loras"] == [] and job["embeddings"] == []


def test_job_values_come_from_the_settings() -> None:
    settings = {
        **BASE, "negative_prompt": "blurry", "frames": 5, "fit": "pad", "seed": 9,
        "guidance": 3.0, "chunk_size": 2, "smooth_bg": True, "smooth_alpha": 0.3,
        "device": "cpu", "dtype": "float32", "write_mp4": True, "compile": True,
        "motion": (3, -2), "model": "  owner/model  ", "adapters": [{"path": "style.safetensors", "weight": 0.5}],
    }  # fmt: skip
    job = jobs.build_job(settings, out="/tmp/o", fps=24, defaults=MODELS)
    assert {k: job[k] for k in settings if k not in ("motion", "model", "adapters")} == {
        k: v for k, v in settings.items() if k not in ("motion", "model", "adapters")
    }
    assert job["motion"] == [3.0, -2.0] and job["model"] == "owner/model"
    assert job["loras"] == [{"path": "style.safetensors", "weight": 0.5}]


def test_base_model_falls_back_to_the_preferences_by_mode() -> None:
    video = {"video": CLIP, "source_frames": 2}
    assert jobs.build_job(BASE, out="/o", fps=24, defaults=MODELS)["model"] == "base"
    pix = jobs.build_job({**BASE, "mode": "pix2pix"}, out="/o", fps=24, defaults=MODELS, **video)
    assert pix["model"] == "p2p"
    with pytest.raises(jobs.JobBuildError, match="no base model set for mode 'pix2pix'"):
        jobs.build_job({**BASE, "mode": "pix2pix"}, out="/o", fps=24, defaults=None, **video)
    with pytest.raises(jobs.JobBuildError, match="no base model set for mode 'text2video'"):
        jobs.build_job(BASE, out="/o", fps=24, defaults={"model": "  "})


def test_mode_and_prompt_are_checked_first() -> None:
    with pytest.raises(jobs.JobBuildError, match=r"mode: must be one of text2video, controlnet, "):
        jobs.build_job({**BASE, "mode": "img2img"}, out="/o", fps=24, defaults=MODELS)
    with pytest.raises(
        jobs.JobBuildError, match=r"^prompt: type a prompt first \(got an empty one\)$"
    ):
        jobs.build_job({**BASE, "prompt": ""}, out="/o", fps=24, defaults=MODELS)
    with pytest.raises(jobs.JobBuildError, match="^prompt: type a prompt first"):
        jobs.build_job({"width": 64, "height": 64}, out="/o", fps=24, defaults=MODELS)
    with pytest.raises(
        jobs.JobBuildError,
        match=r"^prompt: type an editing instruction first \(got an empty one\)$",
    ):
        jobs.build_job(
            {**BASE, "mode": "pix2pix", "prompt": " "},
            out="/o",
            fps=24,
            defaults=MODELS,
            source_frames=3,
            video=CLIP,
        )


def test_strip_driven_frames_match_or_fit_the_source() -> None:
    pix = {**BASE, "mode": "pix2pix", "frames": 99}
    build = functools.partial(jobs.build_job, out="/o", fps=24, defaults=MODELS, video=CLIP)
    assert build(pix, source_frames=1)["frames"] == 1  # Match Source Strip is on by default
    assert build({**pix, "match_source": False, "frames": 5}, source_frames=5)["frames"] == 5
    assert build({**pix, "match_source": False, "frames": 2}, source_frames=5)["frames"] == 2
    too_long = (
        r"^frames: 6 is longer than the source strip \(5 frames\); "
        "lower it or use 'Match Source Strip'$"
    )
    with pytest.raises(jobs.JobBuildError, match=too_long):
        build({**pix, "match_source": False, "frames": 6}, source_frames=5)
    for frames in (None, 0):
        with pytest.raises(jobs.JobBuildError, match=f"pix2pix needs a source strip .* {frames}$"):
            build(pix, source_frames=frames)
    with pytest.raises(
        jobs.JobBuildError, match="^video: Video Instruct-Pix2Pix needs a source strip$"
    ):
        jobs.build_job(pix, out="/o", fps=24, defaults=MODELS, source_frames=3)
    job = build({**pix, "image_guidance": 2.5}, source_frames=3)
    assert job["image_guidance"] == 2.5 and job["video"] == CLIP and job["motion"] is None
    assert build(pix, source_frames=3)["image_guidance"] == 1.5  # the backend's default
    with pytest.raises(jobs.JobBuildError, match="height: must be a multiple of 8, got 60"):
        build({**pix, "height": 60}, source_frames=3)


def test_controlnet_models_by_detector_and_scene_pass() -> None:
    defaults = {**MODELS, "controlnet_models": {"canny": "cn-canny", "openpose": "cn-pose"}}
    defaults["controlnet_models"]["depth"] = "cn-depth"
    entries = [
        {"detector": "openpose", "weight": 0.5},
        {"detector": "none", "model_kind": "depth"},  # a rendered depth pass
        {"detector": "none"},  # no model listed for it: the canny one
        {"model": "  own/cn  "},  # no detector given: none
    ]
    controls = [{**CLIP, "start": i} for i in range(4)]
    job = jobs.build_job(
        {**BASE, "mode": "controlnet", "controlnets": entries},
        out="/o",
        fps=24,
        defaults=defaults,
        source_frames=3,
        controls=controls,
    )
    assert [c["model"] for c in job["controlnets"]] == ["cn-pose", "cn-depth", "cn-canny", "own/cn"]
    assert [c["weight"] for c in job["controlnets"]] == [0.5, 1.0, 1.0, 1.0]
    assert [c["control"]["start"] for c in job["controlnets"]] == [0, 1, 2, 3]
    assert [c["detector"] for c in job["controlnets"]] == ["openpose", "none", "none", "none"]


def test_scene_motion_vectors_only_for_flow_controlnet_jobs() -> None:
    """A scene-driven flow job names the rendered vectors; paper jobs and pix2pix never do,
    and the stored path follows the .blend (map_input_paths) unless it is "estimate"."""
    build = functools.partial(
        jobs.build_job,
        out="/o",
        fps=24,
        source_frames=3,
        defaults=MODELS,
        flow_source="/staged/flow",
    )
    cn = {**BASE, "mode": "controlnet", "controlnets": [{"model": "a"}]}
    assert build({**cn, "consistency": "flow"}, controls=[CLIP])["flow_source"] == "/staged/flow"
    assert build({**cn, "consistency": "paper"}, controls=[CLIP])["flow_source"] is None
    pix = {**BASE, "mode": "pix2pix", "consistency": "flow"}
    assert build(pix, video=CLIP)["flow_source"] is None  # estimated from its source
    moved = jobs.map_input_paths({"flow_source": "/staged/flow"}, lambda p: "//" + p[1:])
    assert moved["flow_source"] == "//staged/flow"
    kept = jobs.map_input_paths({"flow_source": "estimate"}, lambda p: "//" + p)
    assert kept["flow_source"] == "estimate"


def test_controlnet_problems_name_the_entry() -> None:
    build = functools.partial(
        jobs.build_job, out="/o", fps=24, source_frames=3, controls=[CLIP, CLIP]
    )
    two = {**BASE, "mode": "controlnet", "controlnets": [{"model": "a"}, {}]}
    unset = (
        r"^ControlNet 2: no model set \(detector 'none'\); "
        "set one in the panel or preferences$"
    )
    with pytest.raises(jobs.JobBuildError, match=unset):
        build(two, defaults=MODELS)
    with pytest.raises(jobs.JobBuildError, match="controlnets: 2 ControlNets but 1 control videos"):
        jobs.build_job(two, out="/o", fps=24, defaults=MODELS, source_frames=3, controls=[CLIP])
    none = "^controlnets: add at least one ControlNet for ControlNet mode$"
    with pytest.raises(jobs.JobBuildError, match=none):
        build({**BASE, "mode": "controlnet"}, defaults=MODELS)
    with pytest.raises(jobs.JobBuildError, match="controlnet needs a source strip"):
        jobs.build_job(two, out="/o", fps=24, defaults=MODELS, controls=[CLIP, CLIP])


def test_adapter_fields_split_loras_and_embeddings() -> None:
    entries = [
        {"path": " a.safetensors "},  # a LoRA unless it says otherwise, at full weight
        {"kind": "embedding", "path": "owner/emb", "token": " <tok> "},
        {"kind": "lora", "path": "b", "weight": 0.25},
    ]
    assert jobs.adapter_fields(entries) == {
        "loras": [{"path": "a.safetensors", "weight": 1.0}, {"path": "b", "weight": 0.25}],
        "embeddings": [{"path": "owner/emb", "token": "<tok>"}],
    }
    with pytest.raises(jobs.JobBuildError, match="LoRA 1: choose a .safetensors file"):
        jobs.adapter_fields([{"kind": "lora", "path": "  "}])
    with pytest.raises(jobs.JobBuildError, match="Embedding 2: choose a .safetensors file"):
        jobs.adapter_fields([{"path": "a"}, {"kind": "embedding"}])
    with pytest.raises(jobs.JobBuildError, match="Embedding 1: type the token that calls it"):
        jobs.adapter_fields([{"kind": "embedding", "path": "e", "token": " "}])
    with pytest.raises(jobs.JobBuildError, match="Embedding 1: type the token that calls it"):
        jobs.adapter_fields([{"kind": "embedding", "path": "e"}])


def test_rebuild_takes_every_regenerate_field_from_the_panel() -> None:
    stored = jobs.build_job(
        {**BASE, "frames": 3, "steps": 10, "adapters": [{"path": "old.safetensors"}]},
        out="/tmp/old",
        fps=24,
        defaults=MODELS,
    )
    stored = jobs.validate({**stored, "frame_range": [1, 2], "t0": 2, "t1": 5})
    panel = {
        "prompt": "a dog", "negative_prompt": "blurry", "seed": 5, "steps": 3, "guidance": 2.0,
        "image_guidance": 1.25, "width": 72, "height": 80, "fit": "stretch", "chunk_size": 2,
        "smooth_bg": True, "smooth_alpha": 0.3, "device": "cpu", "dtype": "float32",
        "write_mp4": True, "compile": True,
    }  # fmt: skip
    assert set(panel) == set(jobs.REGENERATE_FIELDS)
    changed = jobs.rebuild_job(
        stored,
        {**panel, "model": " other ", "motion": (1, 2), "frames": 4, "adapters": []},
        out="/tmp/new",
    )
    assert {k: changed[k] for k in panel} == panel
    assert changed["model"] == "other" and changed["motion"] == [1.0, 2.0]
    assert changed["frames"] == 4 and changed["loras"] == [] and changed["out"] == "/tmp/new"
    # The stored job's own sharding and t0/t1 are not carried over: t0/t1 follow the steps.
    assert changed["frame_range"] is None
    assert (changed["t0"], changed["t1"]) == PROTOCOL.resolve_t0_t1(3)
    # Settings the panel does not send keep the stored values.
    kept = jobs.rebuild_job(stored, {"prompt": "  ", "seed": 6}, out="/tmp/new")
    assert kept["prompt"] == "a cat" and kept["seed"] == 6 and kept["frames"] == 3
    assert kept["model"] == "base" and kept["loras"] == stored["loras"]
    assert kept["motion"] == stored["motion"]
    assert (kept["t0"], kept["t1"]) == PROTOCOL.resolve_t0_t1(10) != (2, 5)


def test_rebuild_updates_controlnets_only_when_the_panel_lists_as_many() -> None:
    by_detector = {"canny": "cn-canny", "openpose": "cn-pose", "depth": "cn-depth"}
    defaults = {**MODELS, "controlnet_models": by_detector}
    entries = [{"model": "cn-a", "weight": 0.7, "detector": "canny"}, {"detector": "openpose"}]
    stored = jobs.build_job(
        {**BASE, "mode": "controlnet", "controlnets": entries},
        out="/tmp/old",
        fps=24,
        defaults=defaults,
        source_frames=4,
        controls=[CLIP, {**CLIP, "start": 2}],
    )
    panel = [{"weight": 0.3, "detector": "depth"}, {"model": "cn-b"}]
    changed = jobs.rebuild_job(stored, {"controlnets": panel}, out="/o", defaults=defaults)
    old, new = stored["controlnets"], changed["controlnets"]
    # A new detector with an empty model takes the preferences' model for that detector
    # (not the stored canny ControlNet); weight and detector not given keep theirs.
    assert [c["model"] for c in new] == ["cn-depth", "cn-b"]
    assert [c["weight"] for c in new] == [0.3, 1.0] and new[0]["detector"] == "depth"
    assert new[1]["detector"] == "openpose"
    # An empty model with the same detector keeps the stored model.
    same = [{"weight": 0.5, "detector": "canny"}, {"detector": "openpose"}]
    kept = jobs.rebuild_job(stored, {"controlnets": same}, out="/o", defaults=defaults)
    assert [c["model"] for c in kept["controlnets"]] == ["cn-a", "cn-pose"]
    assert kept["controlnets"][0]["weight"] == 0.5
    # A new detector the preferences have no model for is named.
    bare = {**MODELS, "controlnet_models": {}}
    with pytest.raises(
        jobs.JobBuildError, match="ControlNet 1: no model set \\(detector 'depth'\\)"
    ):
        jobs.rebuild_job(stored, {"controlnets": panel}, out="/o", defaults=bare)
    assert [c["control"] for c in new] == [c["control"] for c in old]
    assert changed["frames"] == 4  # a strip-driven job keeps its frame count
    one = jobs.rebuild_job(stored, {"controlnets": panel[:1]}, out="/o", defaults=defaults)
    assert one["controlnets"] == old


# The panel's numeric settings that go into a job (motion is a 2-vector, checked per axis).
JOB_NUMBERS = (
    "seed", "steps", "guidance", "image_guidance", "motion", "frames", "width", "height",
    "chunk_size", "smooth_alpha",
)  # fmt: skip


@pytest.mark.parametrize("mode", ["text2video", "pix2pix"])
def test_every_value_the_panel_allows_makes_a_job_the_backend_accepts(
    scene, image_folder: Path, mode: str
) -> None:
    """A number the panel takes but the backend refuses fails only at Generate, after the
    artist has waited for nothing: Steps allowed 1000 where the backend's limit is 999."""
    settings = scene.t2vz
    settings.mode = mode
    settings.prompt = "a cat"
    settings.size_mode = "CUSTOM"
    settings.match_source = False
    if mode == "pix2pix":
        names = [f"img_{i}.png" for i in range(1, 4)]
        scene.sequence_editor.active_strip = _image_strip(scene, image_folder, names, 2, 1)
    # pix2pix takes its length from the source strip: a longer one is a JobBuildError
    # naming both, tested with the strips.
    numbers = [n for n in JOB_NUMBERS if not (mode == "pix2pix" and n == "frames")]
    checked = []
    for name in numbers:
        prop = settings.bl_rna.properties[name]
        default = getattr(settings, name)
        for limit in (prop.hard_min, prop.hard_max):
            value = (limit,) * prop.array_length if prop.array_length else limit
            setattr(settings, name, value)
            try:  # plan_from_panel validates the job too
                job = operators.plan_from_panel(bpy.context).job
                PROTOCOL.validate_job(json.loads(json.dumps(job)))
            except PROTOCOL.JobError as exc:
                pytest.fail(f"{name} = {limit} (the panel's limit): {exc}")
            checked.append((name, limit))
        setattr(settings, name, default)
    assert len(checked) == 2 * len(numbers)


def test_the_compile_preference_reaches_the_job(scene) -> None:
    """The preference (not the scene) decides whether the backend compiles the UNet."""
    from blender_t2vz import operators, preferences

    prefs = preferences.get_prefs()
    settings = scene.t2vz
    try:
        for on in (False, True):
            prefs.compile_unet = on
            values = operators.job_values(settings, scene, prefs)
            assert values["compile"] is on
            job = jobs.build_job(
                {**values, "prompt": "a cat"}, out="/tmp/o", fps=24, defaults=MODELS
            )
            assert job["compile"] is on
    finally:
        prefs.compile_unet = False


def test_a_stored_job_never_chooses_where_its_regeneration_goes(tmp_path: Path) -> None:
    """A .blend from someone else carries jobs on its strips: their out is not honoured."""
    stored = jobs.build_job(
        {"prompt": "a cat", "width": 64, "height": 64, "steps": 3, "seed": 1},
        out=tmp_path / "mine" / "first",
        fps=24,
        defaults={"model": "builtin:tiny"},
    )
    stored["out"] = "~/.config/autostart/../autostart/evil_result"  # edited in the .blend
    mine = tmp_path / "mine" / "take 2"
    rebuilt = jobs.rebuild_job(stored, {"seed": 2}, out=mine)
    assert rebuilt["out"] == str(mine)
