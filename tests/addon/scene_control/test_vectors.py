"""Scene-driven ControlNet jobs with consistency "flow": Blender's Vector pass as flow_source.

A fresh .blend with a cube that moves a known step a frame under an orthographic camera,
planned the way Generate plans it: the job's flow_source is a folder of one .npy a frame in
backend/media/flow.py's layout, the vectors on the cube are its motion in pixels, and the
renders are shared with the depth control and reused from the cache by a second plan.
"""

from pathlib import Path

import bpy
import numpy as np
import pytest

from blender_t2vz import operators, runtime, strips

from .rig_scene import add_cube

ORTHO_SCALE = 10.0  # world units across the frame's width
STEP = (1.0, 0.25)  # world units a frame, x right and y up (the camera looks down -Z)
FRAMES = 3


def _moving_cube_shot(scene) -> None:
    """An orthographic camera above a cube keyed one STEP a frame, frames 0 to FRAMES + 1
    (the Vector pass of frame f reads f - 1 and f + 1)."""
    cam_data = bpy.data.cameras.new("Flow camera")
    cam_data.type = "ORTHO"
    cam_data.ortho_scale = ORTHO_SCALE
    camera = bpy.data.objects.new("Flow camera", cam_data)
    camera.location = (0.0, 0.0, 10.0)
    scene.collection.objects.link(camera)
    scene.camera = camera
    cube = add_cube(scene, "Moving cube", (0.0, 0.0, 0.0), size=3.0)
    for frame in range(FRAMES + 2):
        cube.location = (-1.5 + STEP[0] * frame, -0.25 + STEP[1] * frame, 0.0)
        cube.keyframe_insert("location", frame=frame)
    scene.frame_start, scene.frame_current = 1, 1


def _depth_job(scene, consistency: str) -> None:
    settings = scene.t2vz
    settings.mode = "controlnet"
    settings.prompt = "a box sliding over a table"
    settings.frames = FRAMES
    settings.consistency = consistency
    item = settings.controlnets.add()
    item.source = "SCENE"
    item.scene_pass = "DEPTH"


@pytest.fixture
def renders():
    """Counts Blender renders while the test runs."""
    count = []

    def counted(*_args) -> None:
        count.append(1)

    bpy.app.handlers.render_pre.append(counted)
    try:
        yield count
    finally:
        bpy.app.handlers.render_pre.remove(counted)


def _cache_entries(scene) -> list[Path]:
    return sorted((Path(scene.t2vz.output_dir) / ".t2vz_inputs" / "scene_cache").glob("*.npz"))


def test_a_flow_job_carries_the_scene_motion_vectors(fresh_scene, renders) -> None:
    _moving_cube_shot(fresh_scene)
    _depth_job(fresh_scene, "flow")
    plan = operators.plan_from_panel(bpy.context)
    try:
        job = plan.job
        assert job["consistency"] == "flow"
        folder = Path(job["flow_source"])
        files = sorted(folder.glob("*.npy"))
        assert [p.name for p in files] == [f"frame_{i:05d}.npy" for i in (1, 2, 3)]
        width, height = job["width"], job["height"]
        px = width / ORTHO_SCALE  # sensor fit: the ortho scale spans the wider side
        step_px = np.array([STEP[0], -STEP[1]]) * px  # y down on screen
        for path in files:
            v = np.load(path)
            assert v.shape == (height, width, 4) and v.dtype == np.float32
            cube = np.abs(v).sum(axis=-1) > 1e-3
            assert abs(cube.sum() - (3.0 * px) ** 2) < 0.15 * (3.0 * px) ** 2  # the cube's face
            assert not np.abs(v[~cube]).any()  # the empty background does not move
            # Every cube pixel within half a pixel of the true motion: to the previous frame
            # -step, to the next +step (one Cycles sample: no blending at the edges).
            np.testing.assert_allclose(v[cube][:, :2], np.tile(-step_px, (cube.sum(), 1)), atol=0.5)
            np.testing.assert_allclose(v[cube][:, 2:], np.tile(step_px, (cube.sum(), 1)), atol=0.5)
        # One render a frame gave the vectors and the depth control both.
        assert len(renders) == FRAMES
        assert len(list(Path(job["controlnets"][0]["control"]["path"]).glob("*.png"))) == FRAMES
    finally:
        runtime.remove_tree(plan.staging)
    again = operators.plan_from_panel(bpy.context)
    try:
        assert len(renders) == FRAMES  # the second plan reused every pass from the cache
        first = np.load(files[1])
        np.testing.assert_array_equal(
            np.load(Path(again.job["flow_source"]) / files[1].name), first
        )
    finally:
        runtime.remove_tree(again.staging)


def test_a_frame_renders_again_when_its_neighbour_moves(fresh_scene, renders) -> None:
    """Frame 3's vectors point to frame 4: moving the cube at frame 4 alone (not a job
    frame) renders frame 3 again, and only it."""
    _moving_cube_shot(fresh_scene)
    _depth_job(fresh_scene, "flow")
    runtime.remove_tree(operators.plan_from_panel(bpy.context).staging)
    assert len(renders) == FRAMES
    cube = bpy.data.objects["Moving cube"]
    fresh_scene.frame_set(FRAMES + 1)
    cube.location.x += 1.0
    cube.keyframe_insert("location", frame=FRAMES + 1)
    fresh_scene.frame_set(1)
    plan = operators.plan_from_panel(bpy.context)
    try:
        assert len(renders) == FRAMES + 1
        v = np.load(Path(plan.job["flow_source"]) / f"frame_{FRAMES:05d}.npy")
        cube_px = np.abs(v[..., :2]).sum(axis=-1) > 1e-3  # where it came from frame 2
        step_px = 2.0 * STEP[0] * plan.job["width"] / ORTHO_SCALE  # now twice the step
        assert abs(np.median(v[cube_px][:, 2]) - step_px) < 0.5
    finally:
        runtime.remove_tree(plan.staging)


def test_a_paper_job_renders_no_vectors(fresh_scene, renders) -> None:
    _moving_cube_shot(fresh_scene)
    _depth_job(fresh_scene, "paper")
    plan = operators.plan_from_panel(bpy.context)
    try:
        assert plan.job["consistency"] == "paper" and plan.job.get("flow_source") is None
        assert not (plan.staging / "flow").exists()
        entries = _cache_entries(fresh_scene)
        assert len(renders) == len(entries) == FRAMES
        for entry in entries:
            with np.load(entry) as data:
                assert "vectors" not in data.files
    finally:
        runtime.remove_tree(plan.staging)


def _moving_camera(scene, kind: str) -> None:
    """The cube still, the camera sliding one STEP a frame the other way."""
    cube = bpy.data.objects["Moving cube"]
    cube.animation_data_clear()
    cube.location = (0.0, 0.0, 0.0)
    camera = scene.camera
    camera.data.type = kind
    for frame in range(FRAMES + 2):
        camera.location = (-STEP[0] * frame, -STEP[1] * frame, 10.0)
        camera.keyframe_insert("location", frame=frame)


def test_the_vectors_follow_a_moving_perspective_camera(fresh_scene) -> None:
    """The camera, not the cube, moves: the cube's top face moves by the camera's step."""
    _moving_cube_shot(fresh_scene)
    _moving_camera(fresh_scene, "PERSP")
    _depth_job(fresh_scene, "flow")
    plan = operators.plan_from_panel(bpy.context)
    try:
        v = np.load(Path(plan.job["flow_source"]) / "frame_00002.npy")
        cube = np.abs(v).sum(axis=-1) > 1e-3
        camera = fresh_scene.camera.data
        focal_px = camera.lens / camera.sensor_width * plan.job["width"]
        px = focal_px / (10.0 - 1.5)  # pixels a unit on the top face, 8.5 units away
        step_px = np.array([STEP[0], -STEP[1]]) * px
        # The top face fills most of the cube's pixels (the sides are farther, move less).
        np.testing.assert_allclose(np.median(v[cube], axis=0), [*-step_px, *step_px], atol=0.5)
    finally:
        runtime.remove_tree(plan.staging)


def test_a_moving_orthographic_camera_is_refused(fresh_scene) -> None:
    _moving_cube_shot(fresh_scene)
    _moving_camera(fresh_scene, "ORTHO")
    _depth_job(fresh_scene, "flow")
    with pytest.raises(RuntimeError, match="orthographic and moves around frame 1"):
        bpy.ops.t2vz.generate()
    fresh_scene.t2vz.consistency = "paper"
    plan = operators.plan_from_panel(bpy.context)
    runtime.remove_tree(plan.staging)


@pytest.mark.slow
def test_a_scene_flow_job_generates_through_the_backend(fresh_scene) -> None:
    """Generate with the tiny built-in models: the backend reads the scene's vectors."""
    _moving_cube_shot(fresh_scene)
    _depth_job(fresh_scene, "flow")
    assert bpy.ops.t2vz.generate() == {"FINISHED"}
    outcome = runtime.RUNNER.wait(240.0)
    assert outcome is not None and outcome.level == "INFO", outcome
    (result,) = list(strips.top_strips(fresh_scene.sequence_editor))
    job = strips.absolute_inputs(result, strips.stored_job(result))  # the paths Regenerate reads
    assert job["consistency"] == "flow"
    assert len(list(Path(job["flow_source"]).glob("*.npy"))) == FRAMES
    assert result.frame_final_duration == FRAMES
