"""Blender's Vector pass on a rendered moving cube: which channels point where, in what units.

Flow-guided consistency (backend/media/flow.py) takes motion vectors as (H, W, 4): the
motion of each pixel to the previous frame, then to the next, in pixels, x right and y
down. Cycles writes ``ViewLayer.Vector.X/Y/Z/W``; this test fixes how they map onto that
layout, on a noise-textured cube that moves 1 unit right and 0.25 up a frame under an
orthographic camera (12.8 px a unit), and checks the converted vectors against OpenCV's
DIS estimate between the rendered frames.
"""

import os
import tempfile
from pathlib import Path

import bpy
import numpy as np
import pytest

from blender_t2vz.scene_control.exr import read_exr

WIDTH, HEIGHT = 128, 96
PX_PER_UNIT = WIDTH / 10.0  # ortho_scale 10 across the width
STEP = (1.0, 0.25)  # world units a frame (x right, y up: the camera looks down -Z)


def vector_flow(channels: dict[str, np.ndarray]) -> np.ndarray:
    """(H, W, 4) in backend/media/flow.py's layout from the Vector pass, as measured here:
    X, Y are the offset to the previous frame's position with y up; Z, W the offset FROM the
    next frame's position (current minus next), y up."""
    x, y = channels["ViewLayer.Vector.X"], channels["ViewLayer.Vector.Y"]
    z, w = channels["ViewLayer.Vector.Z"], channels["ViewLayer.Vector.W"]
    return np.stack([x, -y, -z, w], axis=-1).astype(np.float32)


def _textured_material() -> bpy.types.Material:
    mat = bpy.data.materials.new("t2vz_vector_noise")
    mat.use_nodes = True
    nodes = mat.node_tree.nodes
    texture = nodes.new("ShaderNodeTexNoise")  # not periodic: no aliased match for DIS
    texture.inputs["Scale"].default_value = 3.0
    coords = nodes.new("ShaderNodeTexCoord")
    mat.node_tree.links.new(coords.outputs["Generated"], texture.inputs["Vector"])
    emission = nodes.new("ShaderNodeEmission")
    mat.node_tree.links.new(texture.outputs["Color"], emission.inputs["Color"])
    output = next(n for n in nodes if n.type == "OUTPUT_MATERIAL")
    mat.node_tree.links.new(emission.outputs["Emission"], output.inputs["Surface"])
    return mat


@pytest.fixture(scope="module")
def rendered():
    """Frames 1-3 of the moving cube: Combined RGB (uint8), the Vector pass per frame, and
    a folder of the same renders saved as Blender's default OpenEXR MultiLayer (ZIP)."""
    scene = bpy.data.scenes.new("t2vz_vector_test")
    scene.render.engine = "CYCLES"
    scene.cycles.samples = 4
    scene.cycles.device = "CPU"
    scene.render.resolution_x, scene.render.resolution_y = WIDTH, HEIGHT
    scene.render.resolution_percentage = 100
    scene.render.use_motion_blur = False
    scene.view_layers[0].use_pass_vector = True
    settings = scene.render.image_settings
    if hasattr(settings, "media_type"):  # Blender 5.0
        settings.media_type = "MULTI_LAYER_IMAGE"
    settings.file_format = "OPEN_EXR_MULTILAYER"
    settings.exr_codec = "NONE"
    settings.color_depth = "32"
    cam_data = bpy.data.cameras.new("t2vz_vector_cam")
    cam_data.type = "ORTHO"
    cam_data.ortho_scale = 10.0
    cam = bpy.data.objects.new("t2vz_vector_cam", cam_data)
    scene.collection.objects.link(cam)
    cam.location = (0.0, 0.0, 10.0)
    scene.camera = cam
    bpy.ops.mesh.primitive_cube_add(size=3.0)
    cube = bpy.context.active_object
    for coll in list(cube.users_collection):
        coll.objects.unlink(cube)
    scene.collection.objects.link(cube)
    cube.data.materials.append(_textured_material())
    for frame in (1, 2, 3):
        cube.location = (-1.0 + STEP[0] * (frame - 1), -0.25 + STEP[1] * (frame - 1), 0.0)
        cube.keyframe_insert("location", frame=frame)
    folder = tempfile.mkdtemp(prefix="t2vz_vector_")
    zipped = os.path.join(folder, "zip")
    os.mkdir(zipped)
    frames, vectors = [], []
    try:
        for frame in (1, 2, 3):
            scene.frame_set(frame)
            scene.render.filepath = os.path.join(folder, f"f{frame}.exr")
            with bpy.context.temp_override(scene=scene):
                bpy.ops.render.render(write_still=True)
            settings.exr_codec = "ZIP"  # the render again, as Blender saves it by default
            result = bpy.data.images["Render Result"]
            result.save_render(os.path.join(zipped, f"{frame:04d}.exr"), scene=scene)
            settings.exr_codec = "NONE"
            channels = read_exr(scene.render.filepath)
            rgb = np.stack([channels[f"ViewLayer.Combined.{c}"] for c in "RGB"], axis=-1)
            frames.append((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))
            vectors.append(vector_flow(channels))
    finally:
        bpy.data.scenes.remove(scene)
        bpy.data.objects.remove(cube)
        bpy.data.objects.remove(cam)
    return frames, vectors, zipped


def test_vector_pass_channels_units_and_signs(rendered) -> None:
    _, vectors, _ = rendered
    v = vectors[1]  # frame 2: came from frame 1, goes on to frame 3 by the same step
    cube = np.abs(v).sum(axis=-1) > 1e-3
    assert cube.sum() > 300
    to_previous = np.median(v[cube][:, :2], axis=0)
    to_next = np.median(v[cube][:, 2:], axis=0)
    step_px = np.array([STEP[0], -STEP[1]]) * PX_PER_UNIT  # y down on screen
    np.testing.assert_allclose(to_previous, -step_px, atol=0.05)
    np.testing.assert_allclose(to_next, step_px, atol=0.05)
    assert not np.abs(v[~cube]).any()  # the background does not move


def test_vector_pass_agrees_with_the_optical_flow_estimate(rendered) -> None:
    cv2 = pytest.importorskip("cv2")
    # The estimate is the backend's (torch): absent where these tests run under another
    # Blender version's bpy environment (T2VZ_TEST_BACKEND_PYTHON); the units test above
    # still checks the pass there.
    pytest.importorskip("torch", reason="the backend's flow estimate needs torch")
    from backend.media.flow import estimate_flow

    frames, vectors, _ = rendered
    v = vectors[1]
    inner = cv2.erode((np.abs(v).sum(axis=-1) > 1e-3).astype(np.uint8), np.ones((9, 9))) > 0
    backward = estimate_flow(frames[1], frames[0])  # frame 2 -> frame 1, as v[..., :2]
    forward = estimate_flow(frames[1], frames[2])  # frame 2 -> frame 3, as v[..., 2:]
    assert inner.sum() > 50
    for estimate, truth in ((backward, v[..., :2]), (forward, v[..., 2:])):
        error = np.median(estimate[inner] - truth[inner], axis=0)
        assert np.abs(error).max() < 0.5, error


def test_blender_exr_frames_give_the_flow_of_the_npy_frames(rendered, tmp_path) -> None:
    """The backend reads Blender's multilayer OpenEXR (multipart, ZIP) as a flow source and
    gets what the add-on's .npy route gives for the same renders."""
    pytest.importorskip("torch", reason="the backend's flow reader needs torch")
    import torch

    from backend.media.flow import FileFlows, read_exr_vectors

    _, vectors, zipped = rendered
    for k, v in enumerate(vectors):
        np.save(tmp_path / f"frame_{k + 1:05d}.npy", v)
        np.testing.assert_array_equal(read_exr_vectors(Path(zipped) / f"{k + 1:04d}.exr"), v)
    from_exr = FileFlows(zipped, range(3), (HEIGHT // 8, WIDTH // 8), (HEIGHT, WIDTH))
    from_npy = FileFlows(tmp_path, range(3), (HEIGHT // 8, WIDTH // 8), (HEIGHT, WIDTH))
    for k in (1, 2):
        torch.testing.assert_close(from_exr[k], from_npy[k], rtol=0, atol=0)
    assert from_exr[1][0].abs().max() > 1  # the cube moved 12.8 px: 1.6 latent px
