"""The pass cache (blender_t2vz/scene_control/cache.py, passes.py): unchanged frames reused."""

from blender_t2vz import scene_control as sc
from blender_t2vz.scene_control import passes

from .rig_scene import FRAMES, H, W


def test_cache_reuses_unchanged_frames(scene3d, tmp_path, monkeypatch):
    renders = []
    real = passes._render_still
    monkeypatch.setattr(
        passes, "_render_still", lambda tmp, path: renders.append(1) or real(tmp, path)
    )
    sc.render_depth_frames(scene3d, tmp_path, FRAMES, W, H)
    assert len(renders) == 3
    sc.render_depth_frames(scene3d, tmp_path, FRAMES, W, H)
    assert len(renders) == 3  # nothing changed: all reused
    far = scene3d.objects["Far"]
    far.location.z += 0.5
    try:
        sc.render_depth_frames(scene3d, tmp_path, [1, 2], W, H)
        assert len(renders) == 5  # the scene changed: re-rendered
        assert sorted(p.name for p in (tmp_path / "depth").iterdir()) == [
            "frame_00001.png",
            "frame_00002.png",
        ]
    finally:
        far.location.z -= 0.5
    sc.render_depth_frames(scene3d, tmp_path, [3], W, H)
    assert len(renders) == 5  # back as it was: frame 3 still cached
    # The same Z pass serves the masks.
    sc.render_mask_frames(scene3d, tmp_path, [3], W, H)
    assert len(renders) == 5
