"""Foreground masks (blender_t2vz/scene_control/masks.py)."""

import pytest

from blender_t2vz import scene_control as sc

from .rig_scene import H, W, project_cube, read


def test_masks_white_on_the_foreground(scene3d, tmp_path):
    everything = read(sc.render_mask_frames(scene3d, tmp_path / "a", [1], W, H)[0])
    assert everything[project_cube(scene3d, "Near")].tolist() == [255, 255, 255]
    assert everything[project_cube(scene3d, "Far")].tolist() == [255, 255, 255]
    assert not everything[2, W // 2].any()
    chosen = read(sc.render_mask_frames(scene3d, tmp_path / "b", [1], W, H, ["Near"])[0])
    assert chosen[project_cube(scene3d, "Near")].tolist() == [255, 255, 255]
    assert not chosen[project_cube(scene3d, "Far")].any()
    with pytest.raises(sc.SceneControlError, match="'Ghost'"):
        sc.render_mask_frames(scene3d, tmp_path / "c", [1], W, H, ["Ghost"])
