"""Fixtures of the scene-control tests (one module per pass of blender_t2vz.scene_control)."""

import os
import tempfile

import pytest

os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="t2vz_bpy_user_"))
pytest.importorskip("bpy")
pytest.importorskip("numpy")
pytest.importorskip("cv2")

from .rig_scene import build_scene3d, remove_scene3d  # noqa: E402


@pytest.fixture(scope="module")
def scene3d():
    """The test scene; removed with all its objects when the module is done."""
    scn, before = build_scene3d()
    yield scn
    remove_scene3d(scn, before)
