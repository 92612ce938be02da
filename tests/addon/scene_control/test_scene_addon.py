"""The add-on hooks of scene control (blender_t2vz/scene_control/addon.py) in the panel."""

import json
from pathlib import Path

import bpy
import pytest

from blender_t2vz import scene_control as sc

from .rig_scene import project_cube, read


class _Layout:
    """Records what a draw hook puts in a panel."""

    def __init__(self):
        self.props = []

    def prop(self, data, name, **_kwargs):
        assert hasattr(data, name), name
        self.props.append(name)


def test_addon_entries_render_scene_passes(addon, scene, scene3d, tmp_path):
    """The panel's "3D Scene" ControlNets become rendered controls in a valid job."""
    from blender_t2vz import operators

    foreground = bpy.data.collections.new("t2vz fg")
    foreground.objects.link(scene3d.objects["Near"])
    settings = scene.t2vz
    settings.mode = "controlnet"
    settings.prompt = "a dancer"
    settings.frames = 2
    settings.smooth_bg = True
    items = []
    for scene_pass in ("DEPTH", "OPENPOSE", "CANNY"):
        item = settings.controlnets.add()
        item.source = "SCENE"
        item.scene_pass = scene_pass
        item.scene_control.scene = scene3d
        item.scene_control.foreground = foreground
        items.append(item)
    items[2].scene_control.edges = "FREESTYLE"
    try:
        plan = operators.plan_from_panel(bpy.context)
        controlnets = plan.job["controlnets"]
        assert [c["detector"] for c in controlnets] == ["none", "none", "none"]
        assert {c["model"] for c in controlnets} == {"builtin:tiny-controlnet"}
        depth, pose, lines = (Path(c["control"]["path"]) for c in controlnets)
        assert (depth.name, pose.name, lines.name) == ("depth", "pose.json", "lines")
        assert len(list(depth.glob("frame_*.png"))) == 2
        assert len(json.loads(pose.read_text())["frames"]) == 2
        masks = Path(plan.job["masks"]["path"])
        mask = read(masks / "frame_00001.png")
        assert mask[project_cube(scene3d, "Near")].all()
        assert not mask[project_cube(scene3d, "Far")].any()
        assert (plan.staging.parent / "scene_cache").is_dir()  # shared between jobs

        items[2].scene_control.edges = "CANNY"
        assert items[2].to_values()["detector"] == "canny"
        layout = _Layout()
        sc.draw_control_settings(layout, bpy.context, items[1])
        assert {"scene", "camera", "characters", "preset", "overrides"} <= set(layout.props)

        items[1].scene_control.overrides = "chin=Head"
        with pytest.raises(sc.SceneControlError, match="unknown keypoint 'chin'"):
            operators.plan_from_panel(bpy.context)
        with pytest.raises(RuntimeError, match="unknown keypoint 'chin'"):  # self.report
            bpy.ops.t2vz.generate()
    finally:
        settings.controlnets.clear()
        for name in ("mode", "prompt", "frames", "smooth_bg"):  # as later tests expect them
            settings.property_unset(name)
        bpy.data.collections.remove(foreground)
