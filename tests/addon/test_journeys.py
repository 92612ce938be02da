"""The artist's journeys of issue 19, each from a new .blend and a new output folder, through
a real ``backend serve`` on the tiny built-in models. (The scene-pass journeys, OpenPose
alone, depth alone and both, are in test_scene_passes_fresh.py.)"""

import json
import shutil
from pathlib import Path

import bpy
import pytest
from conftest import write_png
from test_movie_frames import write_movie

from blender_t2vz import runtime, strips

pytestmark = pytest.mark.slow
TIMEOUT = 240.0


def _results(scene) -> list:
    found = [s for s in strips.top_strips(scene.sequence_editor) if strips.stored_job(s)]
    return sorted(found, key=lambda s: s.channel)


def _run(operator, **kwargs) -> runtime.Outcome:
    assert operator(**kwargs) == {"FINISHED"}
    outcome = runtime.RUNNER.wait(TIMEOUT)
    assert outcome is not None and outcome.level == "INFO", outcome
    return outcome


def _selected(scene) -> list[str]:
    return [s.name for s in strips.every_strip(scene.sequence_editor) if s.select]


def test_text_to_video(fresh_scene) -> None:
    fresh_scene.t2vz.prompt = "a red circle"
    fresh_scene.frame_current = 7
    _run(bpy.ops.t2vz.generate)
    (result,) = _results(fresh_scene)
    assert (result.frame_final_start, result.frame_final_duration) == (7, 3)
    assert fresh_scene.sequence_editor.active_strip == result
    assert _selected(fresh_scene) == [result.name]
    assert Path(bpy.path.abspath(result.directory), "frame_00003.png").is_file()


def test_pix2pix_on_a_trimmed_movie(fresh_scene, tmp_path) -> None:
    movie = write_movie(tmp_path, "MPEG4", ".mp4", 24)
    editor = fresh_scene.sequence_editor
    strip = strips.top_strips(editor).new_movie(
        name="footage", filepath=str(movie), channel=1, frame_start=10
    )
    strip.frame_offset_start, strip.frame_offset_end = 2, 5  # 12 frames, 5 shown
    strips.select_only(editor, strip)
    settings = fresh_scene.t2vz
    settings.mode, settings.prompt = "pix2pix", "make it snowy"
    _run(bpy.ops.t2vz.generate)
    (result,) = _results(fresh_scene)
    assert (result.frame_final_start, result.frame_final_duration) == (12, 5)
    assert result.channel == 2 and result[strips.SOURCE_PROPERTY] == "footage"
    assert strips.stored_job(result)["video"]["start"] == 2


def test_queue_and_batch(fresh_scene, tmp_path) -> None:
    settings = fresh_scene.t2vz
    settings.prompt = "a cat"
    assert bpy.ops.t2vz.generate() == {"FINISHED"}
    assert runtime.RUNNER.busy
    assert bpy.ops.t2vz.generate() == {"FINISHED"}  # queued behind the first
    assert bpy.ops.t2vz.generate() == {"FINISHED"}
    assert len(runtime.RUNNER.queue) == 2
    outs = runtime.RUNNER.outputs()
    assert len(set(outs)) == 3  # each job its own folder, though none exists yet
    assert bpy.ops.t2vz.queue_remove(job_id=runtime.RUNNER.queue[-1].id) == {"FINISHED"}
    outcomes = runtime.RUNNER.wait_all(2 * TIMEOUT)
    assert [o.level for o in outcomes] == ["INFO", "INFO"], outcomes
    assert len(_results(fresh_scene)) == 2 and not Path(outs[2]).exists()

    # Batch: pix2pix for each selected image strip, one after another.
    editor = fresh_scene.sequence_editor
    for strip in list(strips.top_strips(editor)):
        strips.top_strips(editor).remove(strip)
    sources = []
    for k, start in enumerate((1, 20)):
        folder = tmp_path / f"shot{k}"
        for i in (1, 2):
            write_png(folder / f"img_{i}.png", 64, 64, (60 * k, 100, 30 * i))
        strip = strips.top_strips(editor).new_image(
            name=f"shot {k}", filepath=str(folder / "img_1.png"), channel=1, frame_start=start
        )
        strip.elements.append("img_2.png")
        strip.select = True
        sources.append(strip)
    settings.mode, settings.prompt = "pix2pix", "make it snowy"
    assert bpy.ops.t2vz.generate_batch() == {"FINISHED"}
    assert runtime.RUNNER.busy and len(runtime.RUNNER.queue) == 1
    outcomes = runtime.RUNNER.wait_all(2 * TIMEOUT)
    assert [o.level for o in outcomes] == ["INFO", "INFO"], outcomes
    results = sorted(_results(fresh_scene), key=lambda s: s.frame_final_start)
    assert [(r.frame_final_start, r.channel) for r in results] == [(1, 2), (20, 2)]
    assert [r[strips.SOURCE_PROPERTY] for r in results] == ["shot 0", "shot 1"]


def test_takes(fresh_scene) -> None:
    settings = fresh_scene.t2vz
    settings.prompt = "a cat"
    _run(bpy.ops.t2vz.generate)
    (first,) = _results(fresh_scene)
    _run(bpy.ops.t2vz.regenerate, seed="NEW")  # the new take is selected: regenerate it
    _run(bpy.ops.t2vz.regenerate, seed="KEEP")
    first_, second, third = _results(fresh_scene)
    assert first_ == first
    assert [s.name for s in (first, second, third)] == ["a cat", "a cat take 2", "a cat take 3"]
    assert (first.mute, second.mute, third.mute) == (True, True, False)
    seeds = [strips.stored_job(s)["seed"] for s in (first, second, third)]
    assert seeds[1] == seeds[2] and seeds[0] == 3
    assert fresh_scene.sequence_editor.active_strip == third
    assert len({s.frame_final_start for s in (first, second, third)}) == 1


def test_save_move_the_project_reopen_and_regenerate(fresh_scene, tmp_path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    try:
        bpy.ops.wm.save_as_mainfile(filepath=str(project / "edit.blend"))
        scene = bpy.context.scene
        scene.t2vz.output_dir = "//t2vz/"
        scene.t2vz.prompt = "a cat"
        _run(bpy.ops.t2vz.generate)
        (result,) = _results(scene)
        assert result.directory.startswith("//t2vz/")
        bpy.ops.wm.save_mainfile()
        moved = tmp_path / "moved"
        shutil.move(str(project), str(moved))
        bpy.ops.wm.open_mainfile(filepath=str(moved / "edit.blend"))
        scene = bpy.context.scene
        (result,) = _results(scene)
        folder = Path(bpy.path.abspath(result.directory))
        assert folder.parent == moved / "t2vz" and (folder / "frame_00001.png").is_file()
        strips.select_only(scene.sequence_editor, result)
        _run(bpy.ops.t2vz.regenerate, seed="KEEP")
        old, new = _results(scene)
        assert Path(bpy.path.abspath(new.directory)).parent == moved / "t2vz"
        assert new.directory.startswith("//t2vz/") and old.mute
    finally:
        bpy.ops.wm.read_homefile(use_empty=True)  # later tests expect an unsaved file


def _strip_input_paths(job: dict) -> list[str]:
    """The input paths of a stored job: the pix2pix source, the ControlNets' controls."""
    paths = [job["video"]["path"]] if job.get("video") else []
    return paths + [c["control"]["path"] for c in job.get("controlnets") or ()]


@pytest.mark.parametrize("mode", ["pix2pix", "controlnet"])
def test_move_the_project_and_regenerate_from_a_movie_strip(fresh_scene, tmp_path, mode):
    """Pix2pix on a movie strip, and a ControlNet fed by a named strip: the job's inputs
    are stored relative to the .blend, so the regeneration after the move reads the moved
    movie (the old folder is gone)."""
    project = tmp_path / "project"
    (project / "footage").mkdir(parents=True)
    movie = write_movie(project / "footage", "MPEG4", ".mp4", 24)
    try:
        bpy.ops.wm.save_as_mainfile(filepath=str(project / "edit.blend"))
        scene = bpy.context.scene
        editor = scene.sequence_editor_create()
        strip = strips.top_strips(editor).new_movie(
            name="footage", filepath=bpy.path.relpath(str(movie)), channel=1, frame_start=1
        )
        strip.frame_offset_end = 9  # 3 frames shown
        strips.select_only(editor, strip)
        settings = scene.t2vz
        settings.output_dir = "//t2vz/"
        settings.mode, settings.prompt = mode, "make it snowy"
        if mode == "controlnet":
            item = settings.controlnets.add()
            item.source, item.strip_name, item.detector = "STRIP", "footage", "none"
        _run(bpy.ops.t2vz.generate)
        (result,) = _results(scene)
        stored = _strip_input_paths(strips.stored_job(result))
        assert stored == ["//footage/grey_24fps.mp4"]
        bpy.ops.wm.save_mainfile()
        moved = tmp_path / "moved"
        shutil.move(str(project), str(moved))
        bpy.ops.wm.open_mainfile(filepath=str(moved / "edit.blend"))
        scene = bpy.context.scene
        (result,) = _results(scene)
        strips.select_only(scene.sequence_editor, result)
        outcome = _run(bpy.ops.t2vz.regenerate, seed="KEEP")
        old, new = _results(scene)
        assert old.mute and not new.mute and outcome.strip_name == new.name
        job = json.loads((Path(bpy.path.abspath(new.directory)) / "job.json").read_text())
        assert _strip_input_paths(job) == [str(moved / "footage" / "grey_24fps.mp4")]
        assert _strip_input_paths(strips.stored_job(new)) == stored
        # An input left outside the moved folder says so before anything runs.
        (moved / "footage" / "grey_24fps.mp4").unlink()
        strips.select_only(scene.sequence_editor, new)
        with pytest.raises(RuntimeError, match="grey_24fps.mp4, which is missing"):
            bpy.ops.t2vz.regenerate()
    finally:
        bpy.ops.wm.read_homefile(use_empty=True)  # later tests expect an unsaved file


def test_save_as_elsewhere_remaps_the_job_inputs(fresh_scene, tmp_path) -> None:
    """Blender remaps its own relative paths on Save As into another folder; the add-on
    remaps those in a result's job, which Blender does not know of. With Relative Paths
    off, a new result's inputs stay absolute."""
    project = tmp_path / "project"
    frames = [str(write_png(project / "t2vz" / "take" / "frame_00001.png", 64, 64, (9, 9, 9)))]
    movie = write_png(project / "footage" / "clip.png", 64, 64, (1, 2, 3))
    job = {"mode": "pix2pix", "video": {"path": str(movie), "start": 0, "stride": 1.0}}
    try:
        bpy.ops.wm.save_as_mainfile(filepath=str(project / "edit.blend"))
        scene = bpy.context.scene
        result = strips.add_result_strip(scene, frames, 2, 1, "a take", job)
        assert strips.relative_job(result) and not strips.relative_job(result)
        assert strips.stored_job(result)["video"]["path"] == "//footage/clip.png"
        (project / "versions").mkdir()
        bpy.ops.wm.save_as_mainfile(filepath=str(project / "versions" / "edit_v2.blend"))
        result = strips.every_strip(bpy.context.scene.sequence_editor)["a take"]
        assert strips.stored_job(result)["video"]["path"] == "//../footage/clip.png"
        assert strips.absolute_inputs(result, strips.stored_job(result))["video"] == {
            **job["video"],
            "path": str(movie),
        }
        filepaths = bpy.context.preferences.filepaths
        filepaths.use_relative_paths = False
        try:
            other = strips.add_result_strip(bpy.context.scene, frames, 3, 1, "b take", job)
            assert not strips.relative_job(other)
            bpy.ops.wm.save_mainfile()
            assert strips.stored_job(other)["video"]["path"] == str(movie)
        finally:
            filepaths.use_relative_paths = True
    finally:
        bpy.ops.wm.read_homefile(use_empty=True)  # later tests expect an unsaved file
