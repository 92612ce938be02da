"""Job controls from the scene (blender_t2vz/scene_control/controls.py), through the backend."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import bpy
import pytest

from blender_t2vz import scene_control as sc

from .rig_scene import H, W, read

REPO = Path(__file__).resolve().parents[3]
# The backend's python: this one, or the one given when these tests run under another
# Blender version's bpy (as tests/addon/conftest.py does).
BACKEND_PYTHON = os.environ.get("T2VZ_TEST_BACKEND_PYTHON") or sys.executable


def test_errors_name_the_bad_value(scene3d):
    with pytest.raises(sc.SceneControlError, match="'Nobody'"):
        sc.keypoint_frames(scene3d, [1], W, H, [sc.Character("Nobody")])
    with pytest.raises(sc.SceneControlError, match="'Near' is a MESH"):
        sc.keypoint_frames(scene3d, [1], W, H, [sc.Character("Near")])
    with pytest.raises(sc.SceneControlError, match="frame range is empty"):
        sc.render_depth_frames(scene3d, "/nonexistent", [], W, H)
    with pytest.raises(sc.SceneControlError, match="width"):
        sc.render_depth_frames(scene3d, "/nonexistent", [1], 0, H)
    with pytest.raises(sc.SceneControlError, match="'Near' is a MESH, not a CAMERA"):
        sc.render_depth_frames(scene3d, "/nonexistent", [1], W, H, camera="Near")
    with pytest.raises(sc.SceneControlError, match="unknown scene pass 'normals'"):
        sc.build_scene_controls(
            scene3d, tempfile.mkdtemp(), [sc.SceneControl("normals", "m")], [1], W, H
        )
    empty = bpy.data.scenes.new("t2vz_no_camera")
    try:
        with pytest.raises(sc.SceneControlError, match="has no camera"):
            sc.render_depth_frames(empty, "/nonexistent", [1], W, H)
    finally:
        bpy.data.scenes.remove(empty)


def test_scene_controlnet_job_runs_through_the_backend(scene3d, tmp_path):
    """Depth + OpenPose from the scene3d, masks for smoothing, on the tiny local models."""
    folder = tmp_path / "scene"
    controls = [
        sc.SceneControl("depth", "builtin:tiny-controlnet", 1.0),
        sc.SceneControl("openpose", "builtin:tiny-controlnet", 0.5),
    ]
    controlnets, masks = sc.build_scene_controls(
        scene3d, folder, controls, [1, 3], 64, 64, masks=True, foreground=["Near"]
    )
    assert [c["detector"] for c in controlnets] == ["none", "none"]
    assert controlnets[1]["control"]["path"].endswith("pose.json")
    assert len(list((folder / "masks").glob("frame_*.png"))) == 2
    job = {
        "prompt": "a robot dancing",
        "out": str(tmp_path / "out"),
        "mode": "controlnet",
        "model": "builtin:tiny",
        "frames": 2,
        "width": 64,
        "height": 64,
        "steps": 2,
        "controlnets": controlnets,
        "smooth_bg": True,
        "masks": masks,
        "device": "cpu",
        "write_mp4": False,
    }
    from backend.protocol import validate_job

    validate_job(job)
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "T2VZ_CACHE_DIR": os.environ.get("T2VZ_CACHE_DIR", str(tmp_path / "m"))}
    result = subprocess.run(
        [BACKEND_PYTHON, "-m", "backend", "generate", "--job", str(job_file)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    frames = sorted((tmp_path / "out").glob("frame_*.png"))
    assert [f.name for f in frames] == ["frame_00001.png", "frame_00002.png"]
    assert read(frames[0]).shape[:2] == (64, 64)


def test_a_pose_control_with_nobody_in_view_is_an_error(scene3d, tmp_path):
    rig = scene3d.objects["Rig mixamo"]
    saved = rig.location.copy()
    folder = tmp_path / "scene"
    control = sc.SceneControl("openpose", "m", 1.0, [sc.Character(rig.name)])
    try:
        rig.location = (0.0, -12.0, 0.0)  # behind the camera on every frame
        with pytest.raises(sc.SceneControlError, match="'Rig mixamo' is in the camera's view"):
            sc.build_scene_controls(scene3d, folder, [control], [1, 2, 3], W, H)
        assert not (folder / "pose.json").exists()
    finally:
        rig.location = saved
    controlnets, _ = sc.build_scene_controls(scene3d, folder, [control], [1, 2, 3], W, H)
    assert len(json.loads(Path(controlnets[0]["control"]["path"]).read_text())["frames"]) == 3
