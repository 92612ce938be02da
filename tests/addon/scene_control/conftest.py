"""Fixtures of the scene-control tests (one module per pass of blender_t2vz.scene_control).

No module-level skips here: a skip raised while a package's conftest loads stops pytest.
Tests that read images need OpenCV and skip one by one without it (``rig_scene.read``).
"""

import pytest

from .rig_scene import build_scene3d, remove_scene3d


@pytest.fixture(scope="module")
def scene3d():
    """The test scene; removed with all its objects when the module is done."""
    scn, before = build_scene3d()
    yield scn
    remove_scene3d(scn, before)
