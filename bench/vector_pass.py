"""Scene vectors against the estimate: Blender's Vector pass and DIS flow against the truth.

A small scene, built here with bpy: a textured cube moving and turning in front of a
textured plane, seen by a perspective camera that slides and pans. Per frame k, three
renders:

* the Vector pass the add-on gives a flow job, through its own code path
  (``blender_t2vz.scene_control.vectors.render_flow_frames``: one-sample Cycles, the
  (X, -Y, -Z, W) layout the backend reads);
* the picture (Cycles, emission shaders, SAMPLES samples), from which
  ``backend.media.flow.estimate_flow`` (DIS, what ``--flow-source estimate`` uses) finds the
  flow from frame k to frame k - 1;
* the truth: the Position and Object Index passes at pixel centres (pixel filter 0.01 px,
  one sample). Each pixel's world point is carried to frame k - 1 by its object's
  transforms (the cube's matrix at k - 1 times the inverse of its matrix at k; the plane
  stays) and projected through the camera at k - 1; the true backward flow is that position
  minus the point's projection at k. A pixel counts where the point is in frame k - 1's view
  and not hidden there (the frame k - 1 truth render shows the same object at that pixel,
  no nearer than OCCLUSION_TOL scene units).

Printed: endpoint error (px, mean / median / 95th percentile) and the fraction of pixels
within 1 px of the truth, over the pixels visible in both frames, the cube's and the
plane's, for three textures (TEXTURES: the Vector pass does not see texture, an estimate
does).
Run from the repository root with bpy in the venv:

    nice -n 5 .venv/bin/python -m bench.vector_pass
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import bpy  # noqa: I001  (bpy before the backend: its bundled libraries load first)
import numpy as np

from blender_t2vz.scene_control.exr import read_exr
from blender_t2vz.scene_control.vectors import render_flow_frames

SIZE = 128
SAMPLES = 16  # the picture's samples (emission shaders: only anti-aliasing needs them)
OCCLUSION_TOL = 0.3  # scene units: the cube stands 0.75 in front of the plane
CUBE_INDEX = 1
# Texture variants: (plane noise scale, cube noise scale, checker scale on the cube or None;
# the plane's checker is 0.3 of the cube's). Noise scale is per scene unit: 2 on the cube
# gives features of 5 to 10 px at 128 px, 4 of 2 to 5 px.
TEXTURES = {
    "noise": (1.2, 2.0, None),
    "fine noise": (2.4, 4.0, None),
    "checker": (1.2, 4.0, 2.0),
}


def _emission_material(name: str, scale: float, tint, checker: float | None):
    """An emission shader of a noise texture times the tint, or times a checker of it
    (periodic: a pattern optical flow can match one period off)."""
    mat = bpy.data.materials.new(name)
    mat.use_nodes = True
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    coords = nodes.new("ShaderNodeTexCoord")
    noise = nodes.new("ShaderNodeTexNoise")
    noise.inputs["Scale"].default_value = scale
    noise.inputs["Detail"].default_value = 8.0
    noise.inputs["Roughness"].default_value = 0.7
    links.new(coords.outputs["Object"], noise.inputs["Vector"])
    contrast = nodes.new("ShaderNodeMapRange")  # the noise's 0.35..0.65 to 0.1..1
    contrast.inputs["From Min"].default_value = 0.35
    contrast.inputs["From Max"].default_value = 0.65
    contrast.inputs["To Min"].default_value = 0.1
    links.new(noise.outputs["Fac"], contrast.inputs["Value"])
    mix = nodes.new("ShaderNodeMix")
    mix.data_type = "RGBA"
    mix.blend_type = "MULTIPLY"
    mix.inputs["Factor"].default_value = 1.0
    links.new(contrast.outputs["Result"], mix.inputs[6])
    mix.inputs[7].default_value = (*tint, 1.0)
    if checker is not None:
        pattern = nodes.new("ShaderNodeTexChecker")
        pattern.inputs["Scale"].default_value = checker
        pattern.inputs["Color1"].default_value = (*tint, 1.0)
        pattern.inputs["Color2"].default_value = (0.15, 0.15, 0.15, 1.0)
        links.new(coords.outputs["Object"], pattern.inputs["Vector"])
        links.new(pattern.outputs["Color"], mix.inputs[7])
    emission = nodes.new("ShaderNodeEmission")
    links.new(mix.outputs[2], emission.inputs["Color"])
    output = next(n for n in nodes if n.type == "OUTPUT_MATERIAL")
    links.new(emission.outputs["Emission"], output.inputs["Surface"])
    return mat


def _mesh_object(scene, name: str, maker, material) -> bpy.types.Object:
    """A primitive added by ``maker`` (a bpy.ops.mesh operator) into ``scene`` alone."""
    maker()
    obj = bpy.context.active_object
    obj.name = name
    for coll in list(obj.users_collection):
        coll.objects.unlink(obj)
    scene.collection.objects.link(obj)
    obj.data.materials.append(material)
    return obj


def build_scene(frames: int, texture: str):
    """The shot, frames 0..frames + 1 keyed (the Vector pass of f reads f - 1 and f + 1)."""
    plane_scale, cube_scale, checker = TEXTURES[texture]
    scene = bpy.data.scenes.new("t2vz_vector_bench")
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.render.threads_mode, scene.render.threads = "FIXED", 1
    scene.render.resolution_x = scene.render.resolution_y = SIZE
    scene.render.resolution_percentage = 100
    scene.view_settings.view_transform = "Standard"
    cam = bpy.data.objects.new("bench camera", bpy.data.cameras.new("bench camera"))
    cam.data.lens = 50.0
    scene.collection.objects.link(cam)
    scene.camera = cam
    plane_checker = None if checker is None else 0.3 * checker
    plane_mat = _emission_material("bench plane", plane_scale, (0.3, 0.6, 0.9), plane_checker)
    cube_mat = _emission_material("bench cube", cube_scale, (0.95, 0.6, 0.2), checker)
    plane = _mesh_object(
        scene, "bench plane", lambda: bpy.ops.mesh.primitive_plane_add(size=40.0), plane_mat
    )
    plane.location = (0.0, 0.0, -2.0)
    cube = _mesh_object(
        scene, "bench cube", lambda: bpy.ops.mesh.primitive_cube_add(size=2.5), cube_mat
    )
    cube.pass_index = CUBE_INDEX
    bpy.context.preferences.edit.keyframe_new_interpolation_type = "LINEAR"  # constant motion
    for f in range(frames + 2):
        cube.location = (-1.6 + 0.4 * f, -0.6 + 0.15 * f, 0.0)
        cube.rotation_euler = (math.radians(5.0 * f), 0.0, math.radians(8.0 * f))
        cube.keyframe_insert("location", frame=f)
        cube.keyframe_insert("rotation_euler", frame=f)
        cam.location = (0.05 * f, 0.0, 12.0)  # slides right and pans right
        cam.rotation_euler = (0.0, math.radians(-0.5 * f), 0.0)
        cam.keyframe_insert("location", frame=f)
        cam.keyframe_insert("rotation_euler", frame=f)
    return scene, cube, cam


def _render(scene, path: Path) -> Path:
    """Render the scene's current frame to ``path``."""
    scene.render.filepath = str(path)
    scene.render.use_file_extension = False
    with bpy.context.temp_override(scene=scene):
        bpy.ops.render.render(write_still=True, scene=scene.name)
    return path


def _multilayer(scene) -> None:
    settings = scene.render.image_settings
    if hasattr(settings, "media_type"):  # Blender 5.0
        settings.media_type = "MULTI_LAYER_IMAGE"
    settings.file_format = "OPEN_EXR_MULTILAYER"
    settings.exr_codec = "NONE"
    settings.color_depth = "32"


def render_pictures(scene, frames: list[int], folder: Path) -> dict[int, np.ndarray]:
    """(H, W, 3) uint8 RGB pictures of each frame (and the one before the first)."""
    scene.cycles.samples = SAMPLES
    scene.cycles.use_denoising = False
    scene.cycles.filter_width = 1.5
    _multilayer(scene)
    out = {}
    for f in [frames[0] - 1, *frames]:
        scene.frame_set(f)
        channels = read_exr(_render(scene, folder / f"picture_{f}.exr"))
        rgb = np.stack([channels[f"ViewLayer.Combined.{c}"] for c in "RGB"], axis=-1)
        srgb = np.where(
            rgb <= 0.0031308, 12.92 * rgb, 1.055 * np.clip(rgb, 0, None) ** (1 / 2.4) - 0.055
        )
        out[f] = (np.clip(srgb, 0, 1) * 255).round().astype(np.uint8)
    return out


def render_truth(scene, frames: list[int], folder: Path) -> dict[int, dict[str, np.ndarray]]:
    """Per frame: world position (H, W, 3) and object index (H, W) at pixel centres."""
    layer = scene.view_layers[0]
    layer.use_pass_position = True
    layer.use_pass_object_index = True
    scene.cycles.samples = 1
    scene.cycles.filter_width = 0.01
    _multilayer(scene)
    out = {}
    for f in [frames[0] - 1, *frames]:
        scene.frame_set(f)
        ch = read_exr(_render(scene, folder / f"truth_{f}.exr"))
        position = np.stack([ch[f"ViewLayer.Position.{c}"] for c in "XYZ"], axis=-1)
        out[f] = {"position": position, "index": ch["ViewLayer.Object Index.X"].round().astype(int)}
    layer.use_pass_position = layer.use_pass_object_index = False
    scene.cycles.filter_width = 1.5
    return out


def camera_at(scene, cam, frame: int) -> tuple[np.ndarray, np.ndarray]:
    """(4, 4) world -> clip matrix and camera position at ``frame``."""
    scene.frame_set(frame)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    projection = cam.calc_matrix_camera(depsgraph, x=SIZE, y=SIZE)
    view = cam.matrix_world.inverted()
    return np.array(projection @ view), np.array(cam.matrix_world.translation)


def project(clip: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(..., 2) pixel coordinates (x right, y down, pixel centres at +0.5) of world points."""
    h = np.concatenate([points, np.ones(points.shape[:-1] + (1,))], axis=-1) @ clip.T
    ndc = h[..., :2] / h[..., 3:4]
    return np.stack([(ndc[..., 0] + 1) / 2 * SIZE, (1 - ndc[..., 1]) / 2 * SIZE], axis=-1)


def true_flow(
    scene, cube, cam, truth, frame: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(H, W, 2) true backward flow of ``frame``, visible mask, cube mask, and the largest
    distance (px) of a pixel's projected point from its pixel centre (the check that the
    truth render samples pixel centres)."""
    now, before = truth[frame], truth[frame - 1]
    clip_now, _ = camera_at(scene, cam, frame)
    cube_now = np.array(cube.matrix_world)
    clip_before, eye_before = camera_at(scene, cam, frame - 1)
    cube_before = np.array(cube.matrix_world)
    points, is_cube = now["position"], now["index"] == CUBE_INDEX
    carried = points.copy()
    move = cube_before @ np.linalg.inv(cube_now)
    ph = np.concatenate([points[is_cube], np.ones((is_cube.sum(), 1))], axis=-1)
    carried[is_cube] = (ph @ move.T)[:, :3]
    here, there = project(clip_now, points), project(clip_before, carried)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    centre_error = float(np.abs(here - np.stack([xs + 0.5, ys + 0.5], -1)).max())
    col, row = np.floor(there[..., 0]).astype(int), np.floor(there[..., 1]).astype(int)
    inside = (col >= 0) & (col < SIZE) & (row >= 0) & (row < SIZE)
    c, r = np.clip(col, 0, SIZE - 1), np.clip(row, 0, SIZE - 1)
    seen = np.linalg.norm(before["position"][r, c] - eye_before, axis=-1)
    expected = np.linalg.norm(carried - eye_before, axis=-1)
    same = before["index"][r, c] == now["index"]
    visible = inside & same & (seen > expected - OCCLUSION_TOL)
    return there - here, visible, is_cube, centre_error


def errors(flow: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Endpoint error (px) of (n, 2) flows: mean, median, 95th percentile, share within 1 px."""
    epe = np.linalg.norm(flow - truth, axis=-1)
    return {
        "mean": float(epe.mean()),
        "median": float(np.median(epe)),
        "p95": float(np.percentile(epe, 95)),
        "within1": float((epe <= 1.0).mean()),
    }


def measure(texture: str, frames: list[int], work: Path) -> dict[str, list]:
    """Render the shot with ``texture``; per source, (flow, truth, visible, cube) a frame."""
    import cv2

    scene, cube, cam = build_scene(frames[-1], texture)
    try:
        flow_folder = render_flow_frames(scene, work / "flow", [1, *frames], SIZE, SIZE)
        vectors = {f: np.load(flow_folder / f"frame_{f:05d}.npy")[..., :2] for f in frames}
        pictures = render_pictures(scene, frames, work)
        truth = render_truth(scene, frames, work)
        from backend.media.flow import estimate_flow  # torch and OpenCV after the renders

        cv2.setNumThreads(1)
        rows: dict[str, list] = {"vector pass": [], "DIS estimate": []}
        for f in frames:
            gt, visible, is_cube, centre = true_flow(scene, cube, cam, truth, f)
            if centre > 0.01:
                raise RuntimeError(f"the truth render is {centre:.3f} px off pixel centres")
            estimate = estimate_flow(pictures[f], pictures[f - 1])
            rows["vector pass"].append((vectors[f], gt, visible, is_cube))
            rows["DIS estimate"].append((estimate, gt, visible, is_cube))
        return rows
    finally:
        for obj in (cube, cam):
            bpy.data.objects.remove(obj)
        bpy.data.scenes.remove(scene)


def report(texture: str, rows: dict[str, list]) -> None:
    """Print one texture's rows: each source against the truth over all visible pixels,
    the cube's and the plane's."""
    for name, items in rows.items():
        picks = (
            ("all", lambda v, c: v),
            ("cube", lambda v, c: v & c),
            ("plane", lambda v, c: v & ~c),
        )
        for label, pick in picks:
            flow = np.concatenate([a[pick(v, c)] for a, _, v, c in items])
            ref = np.concatenate([b[pick(v, c)] for _, b, v, c in items])
            e = errors(flow, ref)
            print(
                f"{texture:<12}{name:<14}{label:<6}{len(flow):>7}{e['mean']:>9.4f}"
                f"{e['median']:>8.4f}{e['p95']:>7.2f}{e['within1']:>8.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--textures", nargs="+", default=list(TEXTURES), choices=list(TEXTURES))
    args = parser.parse_args()
    started = time.perf_counter()
    frames = list(range(2, args.frames + 1))  # flows k -> k - 1 for k = 2..frames
    print(
        f"{SIZE}x{SIZE}, backward flows of frames {frames[0]}..{frames[-1]}, endpoint error "
        "(px) against the truth over pixels visible in both frames"
    )
    print(
        f"{'texture':<12}{'source':<14}{'pixels':<6}{'count':>7}{'EPE mean':>9}{'median':>8}"
        f"{'p95':>7}{'<=1 px':>8}"
    )
    for texture in args.textures:
        work = Path(tempfile.mkdtemp(prefix="t2vz_vector_bench_"))
        try:
            report(texture, measure(texture, frames, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"time {time.perf_counter() - started:.0f} s, {cpu_model()}, bpy {bpy.app.version_string}"
    )


def cpu_model() -> str:
    """The CPU's model name (lscpu), for the figures' record."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
