"""Scene passes from a fresh start: a new .blend, a new output folder, an empty pass cache.

Each pass alone and every combination is planned the way Generate plans it; OpenPose alone
once failed here (its pass renders nothing, so the shared cache folder it prunes did not
exist yet), so that journey also runs through the real backend.
"""

import itertools
import json
from pathlib import Path

import bpy
import pytest
from journey_scene import build_shot
from scene_control.rig_scene import add_cube

from blender_t2vz import operators, runtime, strips

PASSES = ("OPENPOSE", "DEPTH", "CANNY")
COMBINATIONS = [c for n in (1, 2, 3) for c in itertools.combinations(PASSES, n)]
EXPECTED_CONTROL = {"OPENPOSE": "pose.json", "DEPTH": "depth", "CANNY": "canny"}


def _scene_controlnets(scene, passes) -> None:
    settings = scene.t2vz
    settings.mode = "controlnet"
    settings.prompt = "a dancer on a stage"
    settings.frames = 2
    for scene_pass in passes:
        item = settings.controlnets.add()
        item.source = "SCENE"
        item.scene_pass = scene_pass


@pytest.mark.parametrize("passes", COMBINATIONS, ids=lambda c: "+".join(c).lower())
def test_each_pass_and_combination_plans_from_a_fresh_start(fresh_scene, passes):
    build_shot(fresh_scene)
    _scene_controlnets(fresh_scene, passes)
    out_root = Path(fresh_scene.t2vz.output_dir)
    assert not out_root.exists()  # nothing there yet, not even the pass cache
    plan = operators.plan_from_panel(bpy.context)
    try:
        controls = [Path(c["control"]["path"]) for c in plan.job["controlnets"]]
        assert [p.name for p in controls] == [EXPECTED_CONTROL[p] for p in passes]
        for scene_pass, path in zip(passes, controls, strict=True):
            if scene_pass == "OPENPOSE":
                assert len(json.loads(path.read_text())["frames"]) == 2
            else:
                assert len(list(path.glob("frame_*.png"))) == 2
        assert (out_root / ".t2vz_inputs" / "scene_cache").is_dir()
    finally:
        runtime.remove_tree(plan.staging)


def test_a_failed_first_plan_leaves_the_output_folder_empty(fresh_scene):
    """No camera: the pass cannot render. Nothing is left behind, and a retry once the
    camera is there works."""
    build_shot(fresh_scene)
    camera = fresh_scene.camera
    fresh_scene.camera = None
    _scene_controlnets(fresh_scene, ("OPENPOSE",))
    out_root = Path(fresh_scene.t2vz.output_dir)
    with pytest.raises(RuntimeError, match="camera"):
        bpy.ops.t2vz.generate()
    assert not (out_root / ".t2vz_inputs").exists()
    fresh_scene.camera = camera
    plan = operators.plan_from_panel(bpy.context)
    runtime.remove_tree(plan.staging)


@pytest.mark.slow
def test_openpose_alone_generates_from_a_fresh_start(fresh_scene):
    """The issue's steps: animated armature, camera, ControlNet with 3D Scene > OpenPose,
    Generate: a result strip, the pose control in its job."""
    build_shot(fresh_scene, prop=False)
    _scene_controlnets(fresh_scene, ("OPENPOSE",))
    assert bpy.ops.t2vz.generate() == {"FINISHED"}
    outcome = runtime.RUNNER.wait(240.0)
    assert outcome is not None and outcome.level == "INFO", outcome
    (result,) = [s for s in strips.top_strips(fresh_scene.sequence_editor)]
    job = strips.stored_job(result)
    assert job["mode"] == "controlnet" and job["frames"] == 2
    assert result.frame_final_duration == 2


def test_a_depth_pass_that_sees_nothing_says_so(fresh_scene):
    """Issue 19: the depth pass of a skeleton-only rig sent all-black frames without a word."""
    build_shot(fresh_scene, prop=False)
    _scene_controlnets(fresh_scene, ("DEPTH",))
    with pytest.raises(RuntimeError, match="camera sees no surface at frames 1 to 2"):
        bpy.ops.t2vz.generate()
    inputs = Path(fresh_scene.t2vz.output_dir) / ".t2vz_inputs"
    assert [p.name for p in inputs.iterdir()] == ["scene_cache"]  # no staged job left
    assert not runtime.RUNNER.busy


def test_a_flat_pass_that_sees_nothing_says_so(fresh_scene):
    """The Workbench pass canny reads, of a skeleton-only rig: the world's colour alone,
    in which canny finds no edge. It says so, as depth does; with the prop it renders."""
    build_shot(fresh_scene, prop=False)
    _scene_controlnets(fresh_scene, ("CANNY",))
    with pytest.raises(RuntimeError, match="flat pass shows no surface at frames 1 to 2"):
        bpy.ops.t2vz.generate()
    fresh_scene.frame_current = 5
    with pytest.raises(RuntimeError, match="flat pass shows no surface at frames 5 to 5"):
        bpy.ops.t2vz.control_preview()
    assert not runtime.RUNNER.busy
    add_cube(fresh_scene, "Late prop", (0.0, -1.0, 0.5), size=0.5)
    plan = operators.plan_from_panel(bpy.context)
    runtime.remove_tree(plan.staging)


def _generate(scene) -> object:
    assert bpy.ops.t2vz.generate() == {"FINISHED"}
    outcome = runtime.RUNNER.wait(240.0)
    assert outcome is not None and outcome.level == "INFO", outcome
    (result,) = [s for s in strips.top_strips(scene.sequence_editor)]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("passes", [("DEPTH",), ("OPENPOSE", "DEPTH")], ids=["depth", "both"])
def test_depth_alone_and_both_passes_generate_from_a_fresh_start(fresh_scene, passes):
    build_shot(fresh_scene)
    _scene_controlnets(fresh_scene, passes)
    fresh_scene.frame_current = 3
    result = _generate(fresh_scene)
    job = strips.stored_job(result)
    assert len(job["controlnets"]) == len(passes) and result.frame_final_start == 3
    assert bpy.context.window_manager.t2vz_status.message.startswith("Added")


@pytest.mark.parametrize("scene_pass", ["DEPTH", "CANNY", "OPENPOSE"])
def test_control_preview_renders_the_current_frame(fresh_scene, scene_pass):
    build_shot(fresh_scene)
    _scene_controlnets(fresh_scene, (scene_pass,))
    fresh_scene.frame_current = 5
    assert bpy.ops.t2vz.control_preview() == {"FINISHED"}
    status = bpy.context.window_manager.t2vz_status
    path = Path(status.preview_path)
    assert path.is_file() and ".t2vz_inputs" in path.parts and path.suffix == ".png"
    image = bpy.data.images.load(str(path), check_existing=False)
    try:
        assert tuple(image.size) == fresh_scene.t2vz.size(fresh_scene)
        pixels = list(image.pixels[:])
    finally:
        bpy.data.images.remove(image)
    assert max(pixels[0::4]) > min(pixels[0::4])  # the prop and the rig show: not flat
    if scene_pass == "OPENPOSE":  # the skeleton in the backend's colours, frame 5's pose
        pose = json.loads((path.parent / "pose.json").read_text())["frames"][0]
        assert len(pose) == 1 and sum(p is not None for p in pose[0]) >= 12
        colors = {
            tuple(round(255 * c) for c in pixels[i : i + 3]) for i in range(0, len(pixels), 4)
        }
        assert (255, 0, 0) in colors and (0, 0, 255) in colors  # nose and left knee
    fresh_scene.t2vz.controlnets[0].source = "ACTIVE_STRIP"
    assert not bpy.ops.t2vz.control_preview.poll()
