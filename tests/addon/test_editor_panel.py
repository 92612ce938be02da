"""What an editor expects of the panel (issue 19): labels, wording, which frames a job
renders, which strip is the source; drawn against the recording layout, no backend."""

import json
from pathlib import Path
from types import SimpleNamespace

import bpy
import pytest
from test_panels import Layout

from blender_t2vz import operators, panels, runtime, strips


def _draw(panel_cls) -> list:
    log: list = []
    panel_cls.draw(SimpleNamespace(layout=Layout(log)), bpy.context)
    return log


def _labels(log: list) -> list[str]:
    return [entry[1] for entry in log if entry[0] == "label"]


def _image_strip(scene, folder: Path, name: str, channel: int, start: int = 1):
    return strips.top_strips(scene.sequence_editor).new_image(
        name=name, filepath=str(folder / "img_1.png"), channel=channel, frame_start=start
    )


def test_prompt_fields_have_labels(scene) -> None:
    texts = dict(e[1] for e in _draw(panels.T2VZ_PT_main) if e[0] == "prop_text")
    assert texts["prompt"] == "Prompt" and texts["negative_prompt"] == "Negative"


def test_an_unset_strip_source_reads_pick_a_strip(scene) -> None:
    settings = scene.t2vz
    settings.mode, settings.prompt = "controlnet", "a dancer"
    item = settings.controlnets.add()
    item.source = "STRIP"
    log: list = []
    panels.T2VZ_UL_controlnets.draw_item(
        None, bpy.context, Layout(log), settings, item, 0, settings, "controlnets"
    )
    assert ("label", "pick a strip (canny)") in log
    with pytest.raises(RuntimeError, match="ControlNet 1: pick a strip for its Source"):
        bpy.ops.t2vz.generate()


def test_tooltips_and_the_advanced_panel_for_t0_t1(scene) -> None:
    props = scene.t2vz.bl_rna.properties
    assert "memory" in props["chunk_size"].description
    assert "same" in props["chunk_size"].description  # results do not depend on it
    assert "pans" in props["motion"].description and "still" in props["motion"].description
    assert "built-in shapes model" in props["t0"].description and props["t1"].description
    assert panels.T2VZ_PT_advanced.poll(bpy.context)
    assert {"custom_timesteps", "t0", "t1"} <= {e[1] for e in _draw(panels.T2VZ_PT_advanced)}
    settings = scene.t2vz
    settings.prompt, settings.steps = "a red circle", 20
    settings.custom_timesteps, settings.t0, settings.t1 = True, 8, 10
    job = operators.plan_from_panel(bpy.context).job
    assert (job["t0"], job["t1"]) == (8, 10)
    settings.custom_timesteps = False
    job = operators.plan_from_panel(bpy.context).job
    assert (job["t0"], job["t1"]) != (8, 10)  # the defaults, scaled to the steps
    settings.mode = "pix2pix"  # t0/t1 are text to video's; the prediction type is any mode's
    drawn = {e[1] for e in _draw(panels.T2VZ_PT_advanced)}
    assert "prediction_type" in drawn and not {"custom_timesteps", "t0", "t1"} & drawn


def _scene_controlnet(scene) -> None:
    settings = scene.t2vz
    settings.mode, settings.prompt = "controlnet", "a dancer"
    item = settings.controlnets.add()
    item.source, item.scene_pass = "SCENE", "OPENPOSE"


def test_scene_driven_controlnet_says_which_frames_and_follows_ranges(scene) -> None:
    _scene_controlnet(scene)
    settings = scene.t2vz
    scene.frame_start, scene.frame_end = 1, 44
    scene.frame_current, settings.frames = 40, 8
    log = _draw(panels.T2VZ_PT_main)
    assert "Renders scene frames 40-47" in _labels(log)
    assert "Ends at frame 47, past the scene's end (44)" in _labels(log)
    settings.frame_range = "SCENE"
    scene.frame_start, scene.frame_end = 10, 17
    assert operators.job_frames(scene, settings) == (10, 8)
    assert "Renders scene frames 10-17" in _labels(_draw(panels.T2VZ_PT_main))
    settings.frame_range = "PREVIEW"
    scene.use_preview_range = True
    scene.frame_preview_start, scene.frame_preview_end = 12, 14
    try:
        assert operators.job_frames(scene, settings) == (12, 3)
        assert "Renders scene frames 12-14" in _labels(_draw(panels.T2VZ_PT_main))
    finally:
        scene.use_preview_range = False
    scene.frame_start, scene.frame_end = 1, 250


def test_text2video_follows_the_preview_range_too(scene) -> None:
    settings = scene.t2vz
    settings.prompt, settings.frame_range = "a cat", "PREVIEW"
    scene.use_preview_range = True
    scene.frame_preview_start, scene.frame_preview_end = 20, 23
    try:
        plan = operators.plan_from_panel(bpy.context)
    finally:
        scene.use_preview_range = False
    assert (plan.start, plan.job["frames"]) == (20, 4)


def test_match_source_strip_only_with_a_source_strip(scene, image_folder) -> None:
    settings = scene.t2vz
    props = {e[1] for e in _draw(panels.T2VZ_PT_settings) if e[0] == "prop"}
    assert "match_source" not in props and "frame_range" in props  # text to video
    _scene_controlnet(scene)
    props = {e[1] for e in _draw(panels.T2VZ_PT_settings) if e[0] == "prop"}
    assert "match_source" not in props and "frame_range" in props  # scene-driven only
    settings.mode = "pix2pix"
    scene.sequence_editor.active_strip = _image_strip(scene, image_folder, "src", 1)
    props = {e[1] for e in _draw(panels.T2VZ_PT_settings) if e[0] == "prop"}
    assert "match_source" in props and "frame_range" not in props


@pytest.fixture
def no_speeds(addon):
    """No job has run yet, in this session or in one before (the saved speeds)."""
    prefs = bpy.context.preferences.addons["blender_t2vz"].preferences
    kept, device, runtime.RUNNER.seconds_per_unit = prefs.job_speeds, prefs.device, None
    prefs.job_speeds = "{}"
    yield prefs
    prefs.job_speeds, prefs.device, runtime.RUNNER.seconds_per_unit = kept, device, None


def test_a_long_job_shows_its_estimate(scene, no_speeds) -> None:
    settings = scene.t2vz
    settings.prompt, settings.frames, settings.steps = "a cat", 100, 50
    assert not [t for t in _labels(_draw(panels.T2VZ_PT_main)) if t.startswith("About")]
    # The last job's speed: 32 s per 512x512 frame-step; 100 frames x 50 steps at 64x64
    # are 78.125 of those: 2500 s.
    runtime.RUNNER.seconds_per_unit = 32.0
    try:
        labels = _labels(_draw(panels.T2VZ_PT_main))
    finally:
        runtime.RUNNER.seconds_per_unit = None
    assert "About 42 min at the last job's speed" in labels
    assert runtime.estimate_text(30.0) == "" and runtime.estimate_text(7200.0).startswith("About 2")


def test_the_first_job_of_a_session_shows_an_estimate(scene, no_speeds) -> None:
    """Before any job: a rough figure for the device (none for the tiny built-in models or
    an unknown device); once a job ran, its speed, saved in the preferences for the next
    session, by model and device."""
    settings = scene.t2vz
    settings.prompt, settings.frames, settings.steps = "a cat", 8, 50
    settings.size_mode, settings.width, settings.height = "CUSTOM", 512, 512
    no_speeds.device = "cpu"
    assert operators.panel_estimate(bpy.context) == (None, "")  # builtin:tiny
    settings.model = "some-owner/sd15-model"
    seconds, basis = operators.panel_estimate(bpy.context)
    rough = runtime.ROUGH_SECONDS_PER_UNIT["cpu"]
    assert seconds == pytest.approx(rough * 8 * 50) and "rough figure for CPU" in basis
    labels = _labels(_draw(panels.T2VZ_PT_main))
    assert [t for t in labels if t.startswith("About") and "rough figure for CPU" in t]
    no_speeds.device = "auto"  # not known to run anywhere yet
    assert operators.panel_estimate(bpy.context) == (None, "")
    # A job of another model ran on CUDA with Device "auto": auto means CUDA from now on.
    runtime.remember_speed("other/model", "auto", "cuda", 0.5)
    seconds, basis = operators.panel_estimate(bpy.context)
    assert seconds == pytest.approx(runtime.ROUGH_SECONDS_PER_UNIT["cuda"] * 400)
    assert "CUDA" in basis
    # This model's own speed, saved as a new session finds it (no speed in the runner).
    runtime.remember_speed("some-owner/sd15-model", "auto", "cuda", 0.25)
    saved = json.loads(no_speeds.job_speeds)
    assert saved["speeds"]["auto|some-owner/sd15-model"] == 0.25
    assert operators.panel_estimate(bpy.context) == (100.0, runtime.LAST_SPEED)
    for n in range(runtime.SPEEDS_KEPT + 5):  # the latest are kept
        runtime.remember_speed(f"model {n}", "cpu", "cpu", 1.0)
    speeds = runtime.saved_speeds()["speeds"]
    assert len(speeds) == runtime.SPEEDS_KEPT and "cpu|model 24" in speeds


def test_a_very_long_job_asks_before_it_starts(scene, no_speeds, image_folder) -> None:
    settings = scene.t2vz
    settings.prompt, settings.frames, settings.steps = "a cat", 64, 50
    settings.size_mode, settings.width, settings.height = "CUSTOM", 512, 512
    generate = operators.T2VZ_OT_generate
    runtime.RUNNER.seconds_per_unit = 0.5  # 64 x 50 units: 1600 s, under half an hour
    assert generate.long_job_question(None, bpy.context) == ""
    runtime.RUNNER.seconds_per_unit = 0.6  # 1920 s
    assert generate.long_job_question(None, bpy.context) == (
        "About 32 min at the last job's speed: start it?"
    )
    assert runtime.confirm_text(None) == "" and runtime.confirm_text(1799.0) == ""
    # Regenerate: the strip's job size, the panel's steps.
    editor = scene.sequence_editor
    job = {"mode": "pix2pix", "frames": 32, "width": 512, "height": 512, "model": "m"}
    strip = _image_strip(scene, image_folder, "result", 2)
    strip[strips.JOB_PROPERTY] = json.dumps(job)
    strips.select_only(editor, strip)
    regenerate = operators.T2VZ_OT_regenerate
    assert regenerate.long_job_question(None, bpy.context) == ""  # 32 frames: 960 s
    settings.steps = 100
    assert regenerate.long_job_question(None, bpy.context).startswith("About 32 min")


def test_one_source_strip_rule_for_generate_and_regenerate(scene, image_folder) -> None:
    editor = scene.sequence_editor
    movie = _image_strip(scene, image_folder, "footage", 1)
    result = _image_strip(scene, image_folder, "result", 2)
    result[strips.JOB_PROPERTY] = json.dumps({"prompt": "p", "mode": "text2video"})
    # The active strip is not selected; the result is the one selected strip.
    editor.active_strip = movie
    movie.select, result.select = False, True
    assert strips.source_strip(scene) == result
    assert bpy.ops.t2vz.regenerate.poll() and bpy.ops.t2vz.load_settings.poll()
    # The active strip, selected: it is the source of both, whatever else is selected.
    movie.select = True
    assert strips.source_strip(scene) == movie
    assert not bpy.ops.t2vz.regenerate.poll()
    scene.t2vz.mode = "pix2pix"
    assert bpy.ops.t2vz.generate.poll()
    # Several selected, the active one not among them: no guess.
    other = _image_strip(scene, image_folder, "other", 3)
    movie.select, result.select, other.select = False, True, True
    assert strips.source_strip(scene) is None and not bpy.ops.t2vz.generate.poll()


def test_pix2pix_on_a_result_asks_about_its_source(scene, image_folder) -> None:
    editor = scene.sequence_editor
    settings = scene.t2vz
    settings.mode, settings.prompt = "pix2pix", "make it snowy"
    source = _image_strip(scene, image_folder, "footage", 1)
    result = _image_strip(scene, image_folder, "result", 2, start=2)
    result[strips.JOB_PROPERTY] = json.dumps({"prompt": "p", "mode": "pix2pix"})
    strips.select_only(editor, result)
    assert operators.source_question(bpy.context) == ""  # no source recorded: nothing to ask
    result[strips.SOURCE_PROPERTY] = source.name
    question = operators.source_question(bpy.context)
    assert "'result' is a generated strip" in question and "'footage'" in question
    assert "A generated strip: Generate asks" in _labels(_draw(panels.T2VZ_PT_main))
    plan = operators.plan_from_panel(bpy.context, operators.result_source(scene, result))
    assert (plan.start, plan.above, plan.source) == (1, 1, "footage")
    plan = operators.plan_from_panel(bpy.context)  # the result itself
    assert (plan.start, plan.above, plan.source) == (2, 2, "result")
