"""Generate through a real ``backend serve`` process on built-in local models, headless.

The text2video round trip runs the trained ``builtin:shapes`` model and checks the picture
(a red circle on a blue background shows red and blue); the others run ``builtin:tiny``.

One worker process serves all tests of this module (models stay loaded); the kill test
replaces it. Timers never fire in the bpy module, so ``Runner.wait`` steps the runner.
"""

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import bpy
import numpy as np
import pytest
from conftest import color_strip, write_png

from backend.models import shapes
from blender_t2vz import operators, runtime, strips

pytestmark = pytest.mark.slow
TIMEOUT = 240.0


def _result_strips(scene) -> list:
    return [s for s in strips.top_strips(scene.sequence_editor) if strips.stored_job(s)]


def _snapshot(strip) -> tuple:
    return (strip.name, strip.channel, strip.frame_final_start, strip.frame_final_end, strip.mute)


def _wait_for(kind: str, timeout: float = TIMEOUT) -> None:
    """Step until the running job has reported a message of ``kind``."""
    deadline = time.monotonic() + timeout
    status = bpy.context.window_manager.t2vz_status
    while time.monotonic() < deadline and runtime.RUNNER.busy:
        runtime.step()
        if kind == "progress" and status.progress > 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {kind} before the job ended: {runtime.RUNNER.outcome}")


def _colour_shares(path: Path) -> dict[str, float]:
    """Share of a frame's pixels nearest to each colour of the shapes world (either tone of
    its textures), read through Blender's own image loader."""
    image = bpy.data.images.load(str(path), check_existing=False)
    try:
        width, height = image.size
        pixels = np.empty(width * height * 4, dtype=np.float32)
        image.pixels.foreach_get(pixels)
    finally:
        bpy.data.images.remove(image)
    rgb = pixels.reshape(-1, 4)[:, :3] * 255.0  # (pixels, 3), 8-bit values of the PNG
    names = list(shapes.PALETTE)
    tones = [np.asarray(shapes.PALETTE[n], dtype=np.float32) for n in names]
    tones += [shapes.SHADE * t for t in tones]
    distance = np.linalg.norm(rgb[:, None] - np.stack(tones)[None], axis=-1)  # (pixels, 14)
    owner = np.argmin(distance, axis=1) % len(names)
    return {name: float(np.mean(owner == i)) for i, name in enumerate(names)}


def test_colour_shares_read_a_flat_png(tmp_path: Path) -> None:
    """The reader of the round trip's pictures: a flat orange PNG is all orange."""
    shares = _colour_shares(write_png(tmp_path / "flat.png", 8, 8, shapes.PALETTE["orange"]))
    assert shares["orange"] == 1.0


def test_text2video_round_trip_places_strip_at_current_frame(scene) -> None:
    """The whole chain with the trained shapes model: the strip shows what the prompt says."""
    editor = scene.sequence_editor
    blocker = color_strip(editor, "user color", channel=1, start=1, length=30)
    before = _snapshot(blocker)
    scene.frame_current = 5
    bpy.ops.ed.undo_push(message="test: before generate")
    prefs = bpy.context.preferences.addons["blender_t2vz"].preferences
    settings = scene.t2vz
    settings.prompt = "a red circle on a blue background"
    settings.steps = 10

    prefs.model = "builtin:shapes"
    try:
        assert bpy.ops.t2vz.generate() == {"FINISHED"}
        assert runtime.RUNNER.busy and bpy.ops.t2vz.generate.poll()  # another would queue
        # The first job of the worker loads the shapes model: more time on a busy machine.
        outcome = runtime.RUNNER.wait(2 * TIMEOUT)
    finally:
        prefs.model = "builtin:tiny"
    assert outcome is not None and outcome.level == "INFO", outcome

    (result,) = _result_strips(scene)
    assert result.type == "IMAGE" and result.name == "a red circle on a blue background"
    assert (result.channel, result.frame_final_start, result.frame_final_duration) == (2, 5, 3)
    job = json.loads(result["t2vz_job"])
    out = Path(job["out"])
    assert [e.filename for e in result.elements] == [f"frame_0000{i}.png" for i in (1, 2, 3)]
    assert Path(bpy.path.abspath(result.directory)).resolve() == out.resolve()
    assert all((out / f"frame_0000{i}.png").stat().st_size > 0 for i in (1, 2, 3))
    assert job["prompt"] == settings.prompt and job["frames"] == 3 and job["seed"] == 3
    assert (job["width"], job["height"], job["steps"], job["model"]) == (
        64,
        64,
        10,
        "builtin:shapes",
    )
    # What a person would see: a blue textured background and a red shape on it.
    for i in (1, 2, 3):
        shares = _colour_shares(out / f"frame_0000{i}.png")
        assert shares["blue"] > 0.3 and shares["red"] > 0.03, shares
    assert _snapshot(blocker) == before
    status = bpy.context.window_manager.t2vz_status
    assert status.state == "IDLE" and status.progress == 1.0 and not status.error
    # The panel's preview: the latest finished frame, loaded (icon ids stay 0 headless).
    assert Path(status.preview_path) == out / "frame_00003.png"
    assert runtime.RUNNER.previews[str(out / "frame_00003.png")].image_size[:] == (64, 64)
    assert runtime.RUNNER.worker_alive

    # Adding the strip is one undo step: undo removes it and keeps the user's strip.
    bpy.ops.ed.undo()
    scene = bpy.context.scene
    assert not _result_strips(scene)
    assert _snapshot(strips.top_strips(scene.sequence_editor)["user color"]) == before
    assert out.is_dir()  # undo never deletes files


def test_controlnet_round_trip_and_regenerate(scene, image_folder: Path) -> None:
    editor = scene.sequence_editor
    source = strips.top_strips(editor).new_image(
        name="user frames", filepath=str(image_folder / "img_1.png"), channel=3, frame_start=10
    )
    for i in range(2, 7):
        source.elements.append(f"img_{i}.png")
    source.frame_offset_start = 1
    source.frame_offset_end = 2
    above = color_strip(editor, "user title", channel=4, start=12, length=2)
    editor.active_strip = source
    snapshots = [_snapshot(source), _snapshot(above)]
    files_before = sorted(p.name for p in image_folder.iterdir())
    settings = scene.t2vz
    settings.mode = "controlnet"
    settings.prompt = "a robot"
    item = settings.controlnets.add()
    item.detector = "canny"

    assert bpy.ops.t2vz.generate() == {"FINISHED"}
    outcome = runtime.RUNNER.wait(TIMEOUT)
    assert outcome is not None and outcome.level == "INFO", outcome
    (result,) = _result_strips(scene)
    assert (result.channel, result.frame_final_start, result.frame_final_duration) == (5, 11, 3)
    job = json.loads(result["t2vz_job"])
    assert job["controlnets"][0]["control"]["start"] == 1
    assert len(list(Path(job["out"]).glob("frame_*.png"))) == 3
    pid = bpy.context.window_manager.t2vz_status.worker_pid
    assert pid == runtime.RUNNER.client.pid

    # Regenerate: the result strip's job with the panel's new seed, above that strip.
    for s in strips.top_strips(editor):
        s.select = False
    result.select = True
    editor.active_strip = result
    settings.seed = 42
    assert bpy.ops.t2vz.regenerate() == {"FINISHED"}
    outcome = runtime.RUNNER.wait(TIMEOUT)
    assert outcome is not None and outcome.level == "INFO", outcome
    second = strips.every_strip(editor)[outcome.strip_name]
    regenerated = json.loads(second["t2vz_job"])
    assert regenerated["seed"] == 42 and regenerated["out"] != job["out"]
    assert regenerated["controlnets"] == job["controlnets"]
    assert (second.channel, second.frame_final_start) == (6, 11)
    assert bpy.context.window_manager.t2vz_status.worker_pid == pid  # the same worker
    assert [_snapshot(source), _snapshot(above)] == snapshots
    assert sorted(p.name for p in image_folder.iterdir()) == files_before

    # The new take is the active strip and the only selection; the first one is muted.
    assert editor.active_strip == second and not result.select and result.mute
    # Load Settings From Strip puts the first result's job back into the panel.
    strips.select_only(editor, result)
    settings.prompt = "something else"
    settings.mode = "text2video"
    assert bpy.ops.t2vz.load_settings() == {"FINISHED"}
    assert (settings.prompt, settings.seed, settings.mode) == ("a robot", 3, "controlnet")


def test_escape_cancels_without_strip_or_output(scene) -> None:
    settings = scene.t2vz
    settings.prompt = "a long job"
    # Far longer than the bound below (over half a minute): the cancel, not the job's end,
    # stops it, however late a busy machine lets this test send it.
    settings.steps = 900
    settings.frames = 6
    out_root = Path(settings.output_dir)
    assert bpy.ops.t2vz.generate() == {"FINISHED"}
    job = runtime.RUNNER.job
    _wait_for("progress")

    # ESC in the generate operator's modal handler.
    fake_op = SimpleNamespace(_job_id=job.id, _timer=None, report=lambda *a: None)
    esc = SimpleNamespace(type="ESC", value="PRESS")
    assert operators._JobOperator.modal(fake_op, bpy.context, esc) == {"RUNNING_MODAL"}
    assert bpy.context.window_manager.t2vz_status.state == "CANCELLING"
    started = time.monotonic()
    outcome = runtime.RUNNER.wait(TIMEOUT)
    assert outcome is not None and outcome.message == "Cancelled", outcome
    assert time.monotonic() - started < 20
    assert not _result_strips(scene)
    assert not Path(job.job["out"]).exists()
    assert not out_root.exists() or not any(out_root.iterdir())
    assert operators._JobOperator.modal(
        fake_op, bpy.context, SimpleNamespace(type="TIMER", value="NOTHING")
    ) == {"FINISHED"}
    assert runtime.RUNNER.worker_alive


def test_killed_worker_is_reported_and_replaced(scene) -> None:
    settings = scene.t2vz
    settings.prompt = "doomed"
    settings.steps = 900  # still running when it is killed, however late that comes
    settings.frames = 6
    assert bpy.ops.t2vz.generate() == {"FINISHED"}
    _wait_for("progress")
    old_pid = runtime.RUNNER.client.pid
    os.kill(old_pid, signal.SIGKILL)
    outcome = runtime.RUNNER.wait(30)
    assert outcome is not None and outcome.level == "ERROR"
    assert "backend worker stopped" in outcome.message and "new one starts" in outcome.message
    status = bpy.context.window_manager.t2vz_status
    assert "backend worker stopped" in status.error and status.state == "IDLE"
    assert not _result_strips(scene)
    assert not runtime.RUNNER.worker_alive

    settings.prompt = "after the crash"
    settings.steps = 2
    settings.frames = 2
    assert bpy.ops.t2vz.generate() == {"FINISHED"}
    outcome = runtime.RUNNER.wait(TIMEOUT)
    assert outcome is not None and outcome.level == "INFO", outcome
    assert runtime.RUNNER.client.pid != old_pid
    assert len(_result_strips(scene)) == 1 and not status.error
