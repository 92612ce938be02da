"""Control images rendered from the 3D scene: depth, OpenPose keypoints, edges and masks.

Runs inside Blender (bpy, mathutils, and the numpy Blender bundles for pixel arrays; never
torch, diffusers or cv2). Everything renders on a temporary scene that links the user's
objects, so the user's render settings are never touched, and the temporary scene is
removed afterwards whatever happens.

* depth: Cycles at one sample writes the Z pass into a multilayer OpenEXR, read here;
  frames become inverse depth, near bright, normalised over the whole shot (MiDaS-like).
* openpose: armature bones projected through the camera into the OpenPose COCO-18 layout,
  written as keypoint JSON (``{"format": "openpose18", "frames": ...}``) that the backend
  draws; keypoints behind the camera or outside the frame are left out (null).
* canny: a Workbench flat-shaded pass; the backend runs its canny detector on it.
* lines: Freestyle lines rendered as a pass, white on black.
* masks: foreground masks (white) for background smoothing, from the alpha and Z passes.

Rendered passes are cached under ``<folder>/cache`` by a hash of what affects them (frame,
camera, evaluated object transforms and geometry, settings), so unchanged frames are reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import bpy
import numpy as np
from bpy.props import EnumProperty, PointerProperty, StringProperty
from bpy_extras.object_utils import world_to_camera_view

from . import backend_paths

# The keypoint file contract lives in the backend's protocol module (stdlib only).
_PROTOCOL = backend_paths.load_protocol()
KEYPOINT_NAMES = _PROTOCOL.KEYPOINT_NAMES
POSE_FORMAT = _PROTOCOL.POSE_FORMAT
KINDS = ("depth", "openpose", "canny", "lines", "edges")
# Cycles writes this Z where a ray hits nothing.
BACKGROUND_Z = 1e9
# Depth value of the farthest surface of a shot, keeping it apart from the empty background.
DEPTH_FLOOR = 0.1
CACHE_VERSION = "1"

# A bone point: (bone name, position along the bone: 0 head .. 1 tail).
BonePoint = tuple[str, float]

# Blender's human meta-rig (Rigify's): keypoint -> candidate bone points, first found wins.
_METARIG: dict[str, tuple[BonePoint, ...]] = {
    "nose": (("nose.002", 0.0), ("nose", 1.0), ("spine.006", 0.4)),
    "neck": (("spine.004", 0.0),),
    "r_shoulder": (("upper_arm.R", 0.0),),
    "r_elbow": (("forearm.R", 0.0),),
    "r_wrist": (("hand.R", 0.0),),
    "l_shoulder": (("upper_arm.L", 0.0),),
    "l_elbow": (("forearm.L", 0.0),),
    "l_wrist": (("hand.L", 0.0),),
    "r_hip": (("thigh.R", 0.0),),
    "r_knee": (("shin.R", 0.0),),
    "r_ankle": (("foot.R", 0.0),),
    "l_hip": (("thigh.L", 0.0),),
    "l_knee": (("shin.L", 0.0),),
    "l_ankle": (("foot.L", 0.0),),
    "r_eye": (("eye.R", 0.0),),
    "l_eye": (("eye.L", 0.0),),
    "r_ear": (("ear.R", 0.0),),
    "l_ear": (("ear.L", 0.0),),
}

# A generated Rigify rig: the deform bones, else the ORG- copies of the meta-rig's bones.
_RIGIFY: dict[str, tuple[BonePoint, ...]] = {
    key: tuple((f"{prefix}-{bone}", t) for bone, t in points for prefix in ("DEF", "ORG"))
    for key, points in _METARIG.items()
}

# Mixamo: names after the "mixamorig:" prefix (or "mixamorig1:", ...), found per armature.
_MIXAMO: dict[str, tuple[BonePoint, ...]] = {
    "nose": (("Head", 0.4),),
    "neck": (("Neck", 0.0),),
    "r_shoulder": (("RightArm", 0.0),),
    "r_elbow": (("RightForeArm", 0.0),),
    "r_wrist": (("RightHand", 0.0),),
    "l_shoulder": (("LeftArm", 0.0),),
    "l_elbow": (("LeftForeArm", 0.0),),
    "l_wrist": (("LeftHand", 0.0),),
    "r_hip": (("RightUpLeg", 0.0),),
    "r_knee": (("RightLeg", 0.0),),
    "r_ankle": (("RightFoot", 0.0),),
    "l_hip": (("LeftUpLeg", 0.0),),
    "l_knee": (("LeftLeg", 0.0),),
    "l_ankle": (("LeftFoot", 0.0),),
    "r_eye": (("RightEye", 0.0),),
    "l_eye": (("LeftEye", 0.0),),
    "r_ear": (),
    "l_ear": (),
}

PRESETS: dict[str, dict[str, tuple[BonePoint, ...]]] = {
    "rigify": _RIGIFY,
    "mixamo": _MIXAMO,
    "metarig": _METARIG,
}
PRESET_ITEMS = ("auto", "rigify", "mixamo", "metarig", "custom")
# An armature must resolve at least this many keypoints for "auto" to accept a preset.
MIN_AUTO_KEYPOINTS = 4


class SceneControlError(ValueError):
    """Scene controls cannot be made; the message names the bad value."""


@dataclass
class Character:
    """One armature to draw as an OpenPose person."""

    armature: str
    # "auto", one of PRESETS, or "custom" (overrides only).
    preset: str = "auto"
    # keypoint name -> "Bone", "Bone:head", "Bone:tail", "Bone:0.4", or "" to leave it out.
    overrides: dict[str, str] = field(default_factory=dict)


@dataclass
class SceneControl:
    """One ControlNet driven by a pass rendered from the scene."""

    kind: str
    model: str
    weight: float = 1.0
    # openpose only; empty: every armature in the scene with the "auto" preset.
    characters: list[Character] = field(default_factory=list)


# --------------------------------------------------------------------------- bones


def mixamo_prefix(bone_names: Iterable[str]) -> str:
    """The "mixamorig:"-style prefix of an armature's bones, found from its Hips bone."""
    for name in bone_names:
        if name.endswith("Hips") and ":" in name:
            return name[: -len("Hips")]
    return "mixamorig:"


def _preset_points(preset: str, bone_names: set[str]) -> dict[str, tuple[BonePoint, ...]]:
    """A preset's candidates, with Mixamo's prefix applied for these bone names."""
    if preset == "custom":
        return {key: () for key in KEYPOINT_NAMES}
    if preset not in PRESETS:
        raise SceneControlError(f"unknown bone preset {preset!r}; use one of {PRESET_ITEMS}")
    points = PRESETS[preset]
    if preset == "mixamo":
        prefix = mixamo_prefix(bone_names)
        points = {k: tuple((prefix + b, t) for b, t in v) for k, v in points.items()}
    return points


def parse_override(keypoint: str, text: str, bone_names: set[str]) -> BonePoint | None:
    """A per-keypoint override "Bone[:head|:tail|:0..1]" as a bone point; "" leaves it out."""
    if keypoint not in KEYPOINT_NAMES:
        raise SceneControlError(
            f"override for unknown keypoint {keypoint!r}; keypoints: {', '.join(KEYPOINT_NAMES)}"
        )
    text = text.strip()
    if not text:
        return None
    bone, where = text, ""
    head, sep, tail = text.rpartition(":")
    if sep and head in bone_names and text not in bone_names:
        bone, where = head, tail.strip().lower()
    if bone not in bone_names:
        raise SceneControlError(f"override {keypoint}={text!r}: no bone named {bone!r}")
    if where in ("", "head"):
        return bone, 0.0
    if where == "tail":
        return bone, 1.0
    try:
        t = float(where)
    except ValueError:
        raise SceneControlError(
            f"override {keypoint}={text!r}: expected head, tail or 0..1 after ':', got {where!r}"
        ) from None
    if not 0.0 <= t <= 1.0:
        raise SceneControlError(f"override {keypoint}={text!r}: position must be 0..1, got {t}")
    return bone, t


def resolve_bone_map(
    bone_names: Iterable[str], preset: str = "auto", overrides: dict[str, str] | None = None
) -> dict[str, BonePoint]:
    """Keypoint name -> bone point for an armature's bones, from a preset and overrides."""
    names = set(bone_names)
    if preset == "auto":
        preset = detect_preset(names, overrides)
    mapping: dict[str, BonePoint] = {}
    for key, candidates in _preset_points(preset, names).items():
        found = next((c for c in candidates if c[0] in names), None)
        if found is not None:
            mapping[key] = found
    for key, text in (overrides or {}).items():
        point = parse_override(key, text, names)
        if point is None:
            mapping.pop(key, None)
        else:
            mapping[key] = point
    return mapping


def detect_preset(bone_names: Iterable[str], overrides: dict[str, str] | None = None) -> str:
    """The preset that resolves most keypoints for these bones ("custom" if only overrides)."""
    names = set(bone_names)
    scores = {
        p: sum(any(b in names for b, _ in c) for c in _preset_points(p, names).values())
        for p in PRESETS
    }
    best = max(scores, key=lambda p: scores[p])
    if scores[best] >= MIN_AUTO_KEYPOINTS:
        return best
    if overrides:
        return "custom"
    raise SceneControlError(
        "bone names match no preset (rigify, mixamo, metarig); "
        "choose a preset or give per-keypoint overrides"
    )


# --------------------------------------------------------------------------- projection


def project_point(scene, camera, co) -> tuple[float, float] | None:
    """World point -> (x, y) in 0..1 of the frame (y down), or None if behind or outside."""
    v = world_to_camera_view(scene, camera, co)
    if v.z <= 0.0 or not (0.0 <= v.x <= 1.0 and 0.0 <= v.y <= 1.0):
        return None
    return float(v.x), float(1.0 - v.y)


def bone_point_world(armature_eval, point: BonePoint):
    """World position of a bone point on an evaluated armature object."""
    bone = armature_eval.pose.bones[point[0]]
    local = bone.head.lerp(bone.tail, point[1])
    return armature_eval.matrix_world @ local


def person_keypoints(
    scene, camera, armature_eval, bone_map: dict[str, BonePoint]
) -> list[list[float] | None]:
    """The 18 OpenPose keypoints of one evaluated armature seen through the camera."""
    person: list[list[float] | None] = []
    for key in KEYPOINT_NAMES:
        point = bone_map.get(key)
        xy = (
            None
            if point is None
            else project_point(scene, camera, bone_point_world(armature_eval, point))
        )
        person.append(None if xy is None else [round(xy[0], 6), round(xy[1], 6)])
    return person


def _armature(scene, name: str):
    obj = scene.objects.get(name) or bpy.data.objects.get(name)
    if obj is None:
        raise SceneControlError(f"no armature object named {name!r} in scene {scene.name!r}")
    if obj.type != "ARMATURE":
        raise SceneControlError(f"object {name!r} is a {obj.type}, not an ARMATURE")
    return obj


def scene_characters(scene) -> list[Character]:
    """Every armature in the scene that renders, as a character with the "auto" preset."""
    return [Character(o.name) for o in scene.objects if o.type == "ARMATURE" and not o.hide_render]


def keypoint_frames(
    scene,
    frames: Sequence[int],
    width: int,
    height: int,
    characters: Sequence[Character] | None = None,
    camera=None,
) -> list[list[list[list[float] | None]]]:
    """Per frame, the OpenPose people of the characters (people with no keypoint dropped)."""
    characters = list(characters) if characters else scene_characters(scene)
    if not characters:
        raise SceneControlError(f"scene {scene.name!r} has no armature to take a pose from")
    maps = []
    for c in characters:
        obj = _armature(scene, c.armature)
        try:
            maps.append((obj, resolve_bone_map(obj.data.bones.keys(), c.preset, c.overrides)))
        except SceneControlError as exc:
            raise SceneControlError(f"armature {obj.name!r}: {exc}") from None
    out = []
    with temporary_scene(scene, width, height, camera) as tmp:
        for frame in frames:
            dg = _set_frame(tmp, frame)
            cam = tmp.camera.evaluated_get(dg)
            people = [person_keypoints(tmp, cam, o.evaluated_get(dg), m) for o, m in maps]
            out.append([p for p in people if any(k is not None for k in p)])
    return out


def write_pose_json(path: str | os.PathLike, frames: list) -> Path:
    """Write keypoint frames as an ``openpose18`` pose file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(path, json.dumps({"format": POSE_FORMAT, "frames": frames}).encode())
    return path


# --------------------------------------------------------------------------- temporary scenes


def _check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 16384:
            raise SceneControlError(f"{name} must be a whole number of pixels, got {value!r}")


def _camera(scene, camera):
    camera = camera or scene.camera
    if camera is None:
        raise SceneControlError(f"scene {scene.name!r} has no camera; set the scene camera")
    if isinstance(camera, str):
        name, camera = camera, bpy.data.objects.get(camera)
        if camera is None:
            raise SceneControlError(f"no camera object named {name!r}")
    if camera.type != "CAMERA":
        raise SceneControlError(f"object {camera.name!r} is a {camera.type}, not a CAMERA")
    return camera


@contextmanager
def temporary_scene(scene, width: int, height: int, camera=None, objects=None) -> Iterator:
    """A throwaway scene at width x height with the user's objects (or only ``objects``).

    Without ``objects`` it is a linked copy of ``scene`` (same collections, view layers and
    world); with them, a new scene holding just those objects and the camera. The user's
    scene is never modified, and the temporary one is removed on exit.
    """
    _check_size(width, height)
    camera = _camera(scene, camera)
    linestyles = set(bpy.data.linestyles)
    if objects is None:
        tmp = scene.copy()
    else:
        tmp = bpy.data.scenes.new("_t2vz_scene_control")
        tmp.cycles.device = scene.cycles.device
        for obj in {camera, *objects}:
            if tmp.collection.objects.get(obj.name) is None:
                tmp.collection.objects.link(obj)
        tmp.frame_start, tmp.frame_end = scene.frame_start, scene.frame_end
        tmp.render.fps, tmp.render.fps_base = scene.render.fps, scene.render.fps_base
    try:
        tmp.name = "_t2vz_scene_control"
        tmp.camera = camera
        render = tmp.render
        render.resolution_x, render.resolution_y = width, height
        render.resolution_percentage = 100
        render.pixel_aspect_x = render.pixel_aspect_y = 1.0
        render.use_border = False
        render.use_multiview = False
        render.use_motion_blur = False
        render.use_compositing = False
        render.use_sequencer = False
        render.use_stamp = False
        yield tmp
    finally:
        bpy.data.scenes.remove(tmp, do_unlink=True)
        for style in set(bpy.data.linestyles) - linestyles:
            if style.users == 0:
                bpy.data.linestyles.remove(style)


def _set_frame(tmp, frame: int):
    """Evaluate the temporary scene at a frame; its view-layer depsgraph."""
    if isinstance(frame, bool) or not isinstance(frame, int):
        raise SceneControlError(f"frame must be a whole number, got {frame!r}")
    tmp.frame_set(frame)
    return tmp.view_layers[0].depsgraph


def _render_layer(tmp) -> str:
    """The view layer to render: the first one enabled for rendering."""
    layer = next((v for v in tmp.view_layers if v.use), tmp.view_layers[0])
    return layer.name


def _use_cycles(tmp, samples: int = 1) -> None:
    """One-sample Cycles without denoising or bounces: passes, not pictures."""
    tmp.render.engine = "CYCLES"
    cycles = tmp.cycles
    cycles.samples = samples
    cycles.use_denoising = False
    cycles.use_adaptive_sampling = False
    cycles.max_bounces = 0
    cycles.seed = 0
    cycles.use_animated_seed = False
    tmp.render.film_transparent = True


def _use_multilayer_exr(tmp) -> None:
    """Write renders as uncompressed 32-bit multilayer OpenEXR (all passes in one file)."""
    settings = tmp.render.image_settings
    if hasattr(settings, "media_type"):  # Blender 5.0+
        settings.media_type = "MULTI_LAYER_IMAGE"
    settings.file_format = "OPEN_EXR_MULTILAYER"
    settings.exr_codec = "NONE"
    settings.color_depth = "32"


def _render_still(tmp, path: Path) -> Path:
    """Render the temporary scene's current frame to ``path``; the written file."""
    tmp.render.filepath = str(path)
    tmp.render.use_file_extension = False
    bpy.ops.render.render(write_still=True, scene=tmp.name, layer=_render_layer(tmp))
    if not path.is_file():
        raise SceneControlError(f"Blender did not write the render {path}")
    return path


# --------------------------------------------------------------------------- OpenEXR


_EXR_TYPES = {0: np.dtype("<u4"), 1: np.dtype("<f2"), 2: np.dtype("<f4")}


def _exr_headers(buf: bytes) -> tuple[list[dict[str, bytes]], int, bool]:
    """The part headers of an OpenEXR file, the offset after them, and whether multipart."""
    if buf[:4] != b"v/1\x01":
        raise SceneControlError("not an OpenEXR file")
    (version,) = struct.unpack_from("<I", buf, 4)
    multipart = bool(version & 0x1000)
    pos, headers = 8, []
    while True:
        attrs: dict[str, bytes] = {}
        while True:
            end = buf.index(b"\0", pos)
            name, pos = buf[pos:end].decode(), end + 1
            if not name:
                break
            end = buf.index(b"\0", pos)
            pos = end + 1
            (size,) = struct.unpack_from("<i", buf, pos)
            attrs[name] = buf[pos + 4 : pos + 4 + size]
            pos += 4 + size
        if not attrs:
            break
        headers.append(attrs)
        if not multipart:
            break
    return headers, pos, multipart


def _exr_channels(data: bytes) -> list[tuple[str, int]]:
    """(name, pixel type) of each channel in a chlist attribute, in file order."""
    out, pos = [], 0
    while data[pos] != 0:
        end = data.index(b"\0", pos)
        name = data[pos:end].decode()
        (kind,) = struct.unpack_from("<i", data, end + 1)
        out.append((name, kind))
        pos = end + 1 + 16
    return out


def read_exr(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Channels of an uncompressed scanline OpenEXR (single or multipart) as float32 arrays.

    Rows run top to bottom. Only what ``_use_multilayer_exr`` writes is supported.
    """
    buf = Path(path).read_bytes()
    headers, pos, multipart = _exr_headers(buf)
    tables = []
    for h in headers:
        if h.get("compression", b"\0") != b"\0":
            raise SceneControlError(f"{path}: compressed OpenEXR is not supported")
        _, y0, _, y1 = struct.unpack("<4i", h["dataWindow"])
        count = y1 - y0 + 1
        tables.append(struct.unpack_from(f"<{count}Q", buf, pos))
        pos += 8 * count
    out: dict[str, np.ndarray] = {}
    for h, table in zip(headers, tables, strict=True):
        x0, y0, x1, y1 = struct.unpack("<4i", h["dataWindow"])
        width, height = x1 - x0 + 1, y1 - y0 + 1
        channels = sorted(_exr_channels(h["channels"]))
        planes = {name: np.zeros((height, width), np.float32) for name, _ in channels}
        for offset in table:
            pos = offset + (4 if multipart else 0)
            y, _size = struct.unpack_from("<ii", buf, pos)
            pos += 8
            for name, kind in channels:
                dtype = _EXR_TYPES[kind]
                planes[name][y - y0] = np.frombuffer(buf, dtype, width, pos)
                pos += width * dtype.itemsize
        out.update(planes)
    return out


def exr_pass(channels: dict[str, np.ndarray], layer: str, suffix: str) -> np.ndarray:
    """One channel of a view layer ("Depth.Z", "Combined.A", ...) from read_exr's result."""
    name = f"{layer}.{suffix}"
    if name in channels:
        return channels[name]
    matches = [k for k in channels if k.endswith("." + suffix)]
    if not matches:
        raise SceneControlError(f"render has no {suffix} pass; channels: {sorted(channels)}")
    return channels[matches[0]]


# --------------------------------------------------------------------------- cache keys


def _floats(values) -> bytes:
    return struct.pack(f"<{len(values)}d", *values)


def _matrix_bytes(matrix) -> bytes:
    return _floats([v for row in matrix for v in row])


def _geometry_bytes(obj_eval) -> bytes:
    """A digest of an evaluated object's geometry (vertex positions for meshes)."""
    h = hashlib.sha1(obj_eval.type.encode())
    data = obj_eval.data
    if obj_eval.type == "MESH" and data is not None:
        coords = array("f", bytes(4 * 3 * len(data.vertices)))
        data.vertices.foreach_get("co", coords)
        h.update(coords.tobytes())
        h.update(struct.pack("<2q", len(data.polygons), len(data.edges)))
        h.update(repr([m.name if m else "" for m in data.materials]).encode())
    else:
        h.update(_floats([c for corner in obj_eval.bound_box for c in corner]))
    return h.digest()


def _camera_bytes(cam_eval) -> bytes:
    data = cam_eval.data
    params = (
        data.type,
        data.lens,
        data.ortho_scale,
        data.sensor_width,
        data.sensor_height,
        data.sensor_fit,
        data.shift_x,
        data.shift_y,
        data.clip_start,
        data.clip_end,
    )
    return _matrix_bytes(cam_eval.matrix_world) + repr(params).encode()


def scene_state_key(dg, cam_eval, frame: int, settings: str) -> str:
    """Hash of everything a pass depends on: frame, camera, objects, geometry, settings."""
    h = hashlib.sha1(f"t2vz-scene-{CACHE_VERSION}|{frame}|{settings}".encode())
    h.update(_camera_bytes(cam_eval))
    geometry: dict[str, bytes] = {}
    for inst in dg.object_instances:
        obj = inst.object
        h.update(f"{obj.name}|{obj.type}|{inst.is_instance}|{obj.hide_render}".encode())
        h.update(_matrix_bytes(inst.matrix_world))
        skip = obj.type in ("LIGHT", "CAMERA", "EMPTY", "LIGHT_PROBE", "SPEAKER")
        if not skip and obj.name not in geometry:
            geometry[obj.name] = _geometry_bytes(obj)
    for key in sorted(geometry):
        h.update(key.encode() + geometry[key])
    return h.hexdigest()


# --------------------------------------------------------------------------- files


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save_arrays(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    os.replace(tmp, path)


def write_png(path: str | os.PathLike, pixels: np.ndarray, bits: int = 8) -> Path:
    """Write a (H, W) or (H, W, 3) float image in 0..1 (top row first) as an RGB PNG."""
    if bits not in (8, 16):
        raise SceneControlError(f"PNG bit depth must be 8 or 16, got {bits}")
    pixels = np.clip(np.asarray(pixels, np.float32), 0.0, 1.0)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    height, width = pixels.shape[:2]
    rgba = np.ones((height, width, 4), np.float32)
    rgba[:, :, :3] = pixels[::-1]  # Blender images store the bottom row first
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = bpy.data.images.new("_t2vz_png", width, height, alpha=False, float_buffer=bits == 16)
    try:
        if bits == 16:
            image.colorspace_settings.name = "Non-Color"
        image.pixels.foreach_set(rgba.ravel())
        image.file_format = "PNG"
        part = path.with_name(path.name + ".part")  # not an image suffix: never read as a frame
        image.filepath_raw = str(part)
        image.save()
        os.replace(part, path)
    finally:
        bpy.data.images.remove(image)
    return path


def _frame_name(index: int) -> str:
    return f"frame_{index + 1:05d}.png"


def _sequence_paths(out_dir: Path, count: int) -> list[Path]:
    """frame_00001.png .. for ``count`` frames; stale frames beyond are removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = {_frame_name(i) for i in range(count)}
    for stale in out_dir.glob("frame_*.png"):
        if stale.name not in keep:
            stale.unlink()
    return [out_dir / _frame_name(i) for i in range(count)]


def _check_frames(frames: Sequence[int]) -> list[int]:
    frames = list(frames)
    if not frames:
        raise SceneControlError("the frame range is empty")
    for f in frames:
        if isinstance(f, bool) or not isinstance(f, int):
            raise SceneControlError(f"frame must be a whole number, got {f!r}")
    return frames


def _abs(path: str | os.PathLike) -> Path:
    return Path(bpy.path.abspath(str(path)))


def cache_dir(folder: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """The pass cache: ``cache`` if given, else ``<folder>/cache`` (created)."""
    path = _abs(cache) if cache is not None else _abs(folder) / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def prune_cache(cache: str | os.PathLike, used_since: float) -> int:
    """Delete cached passes not written or reused since ``used_since`` (a time.time())."""
    removed = 0
    for path in _abs(cache).iterdir():
        if path.is_file() and path.stat().st_mtime < used_since:
            path.unlink()
            removed += 1
    return removed


# --------------------------------------------------------------------------- passes


@dataclass
class _Pass:
    """How one cached pass is configured, rendered and stored."""

    name: str
    suffix: str
    configure: Callable
    store: Callable


def _configure_z(tmp) -> None:
    _use_cycles(tmp)
    layer = tmp.view_layers[_render_layer(tmp)]
    layer.use_pass_z = True
    tmp.render.use_freestyle = False
    _use_multilayer_exr(tmp)


def _store_z(exr: Path, cached: Path, layer: str) -> None:
    channels = read_exr(exr)
    _save_arrays(
        cached,
        z=exr_pass(channels, layer, "Depth.Z"),
        alpha=exr_pass(channels, layer, "Combined.A"),
    )


def _configure_lines(tmp) -> None:
    _use_cycles(tmp)
    tmp.render.use_freestyle = True
    layer = tmp.view_layers[_render_layer(tmp)]
    layer.use_freestyle = True
    settings = layer.freestyle_settings
    settings.as_render_pass = True
    if not settings.linesets:
        settings.linesets.new("t2vz lines")
    for lineset in settings.linesets:
        if lineset.linestyle is None:  # removed with the temporary scene
            lineset.linestyle = bpy.data.linestyles.new("_t2vz_lines")
    _use_multilayer_exr(tmp)


def _store_lines(exr: Path, cached: Path, layer: str) -> None:
    _save_arrays(cached, lines=exr_pass(read_exr(exr), layer, "Freestyle.A"))


def _configure_flat(tmp, lighting: str = "FLAT") -> None:
    tmp.render.engine = "BLENDER_WORKBENCH"
    shading = tmp.display.shading
    shading.light = lighting
    shading.color_type = "RANDOM"
    shading.show_cavity = False
    shading.show_shadows = False
    shading.show_specular_highlight = False
    tmp.display.render_aa = "FXAA"
    tmp.render.film_transparent = False
    tmp.render.use_freestyle = False
    view = tmp.view_settings
    view.view_transform = "Standard"
    view.look = "None"
    view.exposure, view.gamma = 0.0, 1.0
    settings = tmp.render.image_settings
    if hasattr(settings, "media_type"):
        settings.media_type = "IMAGE"
    settings.file_format = "PNG"
    settings.color_mode = "RGB"
    settings.color_depth = "8"


def _store_copy(rendered: Path, cached: Path, layer: str) -> None:
    shutil.copyfile(rendered, cached.with_name(cached.name + ".part"))
    os.replace(cached.with_name(cached.name + ".part"), cached)


PASSES = {
    "z": _Pass("z", ".npz", _configure_z, _store_z),
    "lines": _Pass("lines", ".npz", _configure_lines, _store_lines),
    "flat": _Pass("flat", ".png", _configure_flat, _store_copy),
}


def render_pass_frames(
    scene,
    folder: str | os.PathLike,
    frames: Sequence[int],
    width: int,
    height: int,
    kind: str,
    camera=None,
    objects=None,
    settings: str = "",
    cache: str | os.PathLike | None = None,
) -> list[Path]:
    """Render (or reuse from the cache) one pass per frame; the cached file of each frame.

    kind: "z" (Z and alpha, .npz), "lines" (Freestyle alpha, .npz) or "flat" (Workbench
    PNG). ``objects`` renders only those objects (and the camera) instead of the scene.
    Cached files live in ``cache`` (default ``<folder>/cache``).
    """
    if kind not in PASSES:
        raise SceneControlError(f"unknown pass {kind!r}; use one of {', '.join(PASSES)}")
    spec, frames, cache = PASSES[kind], _check_frames(frames), cache_dir(folder, cache)
    with temporary_scene(scene, width, height, camera, objects) as tmp:
        spec.configure(tmp)
        layer = _render_layer(tmp)
        only = "" if objects is None else ",".join(sorted(o.name for o in objects))
        config = f"{kind}|{width}x{height}|{layer}|{only}|{settings}"
        out, scratch = [], Path(tempfile.mkdtemp(prefix="t2vz_pass_"))
        try:
            for frame in frames:
                dg = _set_frame(tmp, frame)
                key = scene_state_key(dg, tmp.camera.evaluated_get(dg), frame, config)
                cached = cache / f"{key}{spec.suffix}"
                if cached.is_file():
                    os.utime(cached)  # marks it used for prune_cache
                else:
                    ext = ".png" if kind == "flat" else ".exr"
                    rendered = _render_still(tmp, scratch / f"frame{ext}")
                    spec.store(rendered, cached, layer)
                out.append(cached)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return out


def _load(path: Path, name: str) -> np.ndarray:
    with np.load(path) as data:
        return data[name]


def normalize_depth(depths: Sequence[np.ndarray], floor: float = DEPTH_FLOOR) -> list[np.ndarray]:
    """Z maps of a shot -> inverse depth in 0..1, near bright, one min/max for all frames.

    Background (no hit) is 0; the farthest surface of the shot maps to ``floor`` and the
    nearest to 1, so values do not flicker from frame to frame.
    """
    inverse = [np.where(z < BACKGROUND_Z, 1.0 / np.maximum(z, 1e-6), 0.0) for z in depths]
    hits = [inv[inv > 0] for inv in inverse]
    hits = [h for h in hits if h.size]
    if not hits:
        return [np.zeros_like(z, dtype=np.float32) for z in depths]
    lo = min(float(h.min()) for h in hits)
    hi = max(float(h.max()) for h in hits)
    span = hi - lo
    out = []
    for inv in inverse:
        scaled = np.ones_like(inv) if span <= 1e-12 else (inv - lo) / span
        out.append(np.where(inv > 0, floor + (1.0 - floor) * scaled, 0.0).astype(np.float32))
    return out


def render_depth_frames(
    scene,
    folder: str | os.PathLike,
    frames: Sequence[int],
    width: int,
    height: int,
    camera=None,
    floor: float = DEPTH_FLOOR,
    bits: int = 16,
    cache: str | os.PathLike | None = None,
) -> list[Path]:
    """Depth control frames (inverse depth, near bright, per-shot) as PNGs in folder/depth."""
    cached = render_pass_frames(scene, folder, frames, width, height, "z", camera, cache=cache)
    images = normalize_depth([_load(p, "z") for p in cached], floor)
    paths = _sequence_paths(_abs(folder) / "depth", len(images))
    return [write_png(p, img, bits) for p, img in zip(paths, images, strict=True)]


def edge_method(scene, kind: str = "edges") -> str:
    """ "lines" (Freestyle) or "canny" (Workbench pass): "edges" picks by scene Freestyle."""
    if kind == "edges":
        return "lines" if scene.render.use_freestyle else "canny"
    if kind not in ("lines", "canny"):
        raise SceneControlError(f"unknown edge kind {kind!r}; use edges, lines or canny")
    return kind


def render_edge_frames(
    scene,
    folder: str | os.PathLike,
    frames: Sequence[int],
    width: int,
    height: int,
    kind: str = "edges",
    camera=None,
    cache: str | os.PathLike | None = None,
) -> tuple[list[Path], str]:
    """Edge frames in folder/<method>; the paths and the backend detector to apply."""
    method = edge_method(scene, kind)
    root = _abs(folder)
    if method == "canny":
        cached = render_pass_frames(
            scene, folder, frames, width, height, "flat", camera, cache=cache
        )
        paths = _sequence_paths(root / "canny", len(cached))
        for src, dst in zip(cached, paths, strict=True):
            shutil.copyfile(src, dst)
        return paths, "canny"
    cached = render_pass_frames(scene, folder, frames, width, height, "lines", camera, cache=cache)
    paths = _sequence_paths(root / "lines", len(cached))
    for src, dst in zip(cached, paths, strict=True):
        write_png(dst, _load(src, "lines"))
    return paths, "none"


def _with_children(objects: Iterable) -> list:
    """The objects and all their descendants (a rig and its meshes), without duplicates."""
    out: dict[str, object] = {}
    for obj in objects:
        for o in (obj, *obj.children_recursive):
            out[o.name] = o
    return list(out.values())


def foreground_mask(full_z: np.ndarray, alpha: np.ndarray, fg_z: np.ndarray | None) -> np.ndarray:
    """1 where the foreground is visible: any hit, or the chosen objects where unoccluded."""
    if fg_z is None:
        return (alpha > 0.5).astype(np.float32)
    visible = (fg_z < BACKGROUND_Z) & (fg_z <= full_z * 1.01 + 1e-4)
    return visible.astype(np.float32)


def render_mask_frames(
    scene,
    folder: str | os.PathLike,
    frames: Sequence[int],
    width: int,
    height: int,
    foreground: Sequence | None = None,
    camera=None,
    cache: str | os.PathLike | None = None,
) -> list[Path]:
    """Foreground masks (white) in folder/masks: all geometry, or the chosen objects."""
    full = render_pass_frames(scene, folder, frames, width, height, "z", camera, cache=cache)
    chosen = None
    if foreground:
        objs = [bpy.data.objects.get(o) if isinstance(o, str) else o for o in foreground]
        missing = [n for n, o in zip(foreground, objs, strict=True) if o is None]
        if missing:
            raise SceneControlError(f"no foreground object named {missing[0]!r}")
        fg = render_pass_frames(
            scene, folder, frames, width, height, "z", camera, _with_children(objs), cache=cache
        )
        chosen = [_load(p, "z") for p in fg]
    paths = _sequence_paths(_abs(folder) / "masks", len(full))
    for i, (path, cached) in enumerate(zip(paths, full, strict=True)):
        fg_z = None if chosen is None else chosen[i]
        mask = foreground_mask(_load(cached, "z"), _load(cached, "alpha"), fg_z)
        write_png(path, mask)
    return paths


# --------------------------------------------------------------------------- job controls


def render_scene_control(
    scene,
    folder: str | os.PathLike,
    kind: str,
    frames: Sequence[int],
    width: int,
    height: int,
    camera=None,
    characters: Sequence[Character] | None = None,
    cache: str | os.PathLike | None = None,
) -> tuple[Path, str]:
    """Render one kind of control (see KINDS) into folder; its control path and detector."""
    if kind == "depth":
        paths = render_depth_frames(scene, folder, frames, width, height, camera, cache=cache)
        return paths[0].parent, "none"
    if kind == "openpose":
        people = keypoint_frames(scene, frames, width, height, characters, camera)
        return write_pose_json(_abs(folder) / "pose.json", people), "none"
    if kind in ("canny", "lines", "edges"):
        paths, detector = render_edge_frames(
            scene, folder, frames, width, height, kind, camera, cache=cache
        )
        return paths[0].parent, detector
    raise SceneControlError(f"unknown scene pass {kind!r}; use one of {', '.join(KINDS)}")


def build_scene_controls(
    scene,
    folder: str | os.PathLike,
    controls: Sequence[SceneControl],
    frames: Sequence[int],
    width: int,
    height: int,
    camera=None,
    masks: bool = False,
    foreground: Sequence | None = None,
    cache: str | os.PathLike | None = None,
) -> tuple[list[dict], dict | None]:
    """Render the passes the controls need; job ``controlnets`` dicts and a ``masks`` input.

    ``frames`` are scene frame numbers (one control image each, in order); ``folder`` is
    the job's scene-control folder (created). Passes are cached in ``cache`` (default
    ``<folder>/cache``); cached passes this call did not use are removed.
    """
    frames = _check_frames(frames)
    _check_size(width, height)
    root = _abs(folder)
    root.mkdir(parents=True, exist_ok=True)
    cache = cache_dir(root, cache)
    started = time.time() - 1.0
    controlnets = []
    for i, control in enumerate(controls):
        try:
            path, detector = render_scene_control(
                scene, root, control.kind, frames, width, height, camera, control.characters, cache
            )
        except SceneControlError as exc:
            raise SceneControlError(f"controls[{i}] ({control.kind}): {exc}") from None
        controlnets.append(
            {
                "model": control.model,
                "control": {"path": str(path)},
                "weight": float(control.weight),
                "detector": detector,
            }
        )
    mask_input = None
    if masks:
        render_mask_frames(scene, root, frames, width, height, foreground, camera, cache=cache)
        mask_input = {"path": str(root / "masks")}
    prune_cache(cache, started)
    return controlnets, mask_input


# --------------------------------------------------------------------------- add-on hooks

# Shared pass cache beside the jobs' staging folders; entries unused this long are removed.
CACHE_FOLDER = "scene_cache"
CACHE_MAX_AGE_S = 3 * 24 * 3600
_PASS_KINDS = {"DEPTH": "depth", "OPENPOSE": "openpose", "CANNY": "canny"}


def parse_overrides(text: str) -> dict[str, str]:
    """'nose=Head:0.4; l_ear=EarL' -> {"nose": "Head:0.4", "l_ear": "EarL"}."""
    out: dict[str, str] = {}
    for part in text.replace("\n", ";").split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise SceneControlError(f"bone override {part.strip()!r}: expected keypoint=Bone")
        out[key.strip()] = value.strip()
    return out


def _poll_camera(_self, obj) -> bool:
    return obj.type == "CAMERA"


class T2VZ_SceneControlSettings(bpy.types.PropertyGroup):
    """How a ControlNet entry with source "3D Scene" renders its passes."""

    scene: PointerProperty(
        name="Scene", type=bpy.types.Scene, description="Scene to render; empty: this scene"
    )
    camera: PointerProperty(
        name="Camera",
        type=bpy.types.Object,
        poll=_poll_camera,
        description="Camera to render from; empty: the scene camera",
    )
    edges: EnumProperty(
        name="Edges",
        items=[
            ("CANNY", "Canny of Flat Shading", "Workbench flat pass; the backend runs canny"),
            ("FREESTYLE", "Freestyle Lines", "Freestyle lines of the scene, white on black"),
        ],
        default="CANNY",
    )
    characters: PointerProperty(
        name="Characters",
        type=bpy.types.Collection,
        description="Collection with the armatures to pose; empty: every armature in the scene",
    )
    preset: EnumProperty(
        name="Bone Names",
        items=[
            ("auto", "Auto", "Pick the preset that matches each armature's bones"),
            ("rigify", "Rigify", "A generated Rigify rig (DEF-/ORG- bones)"),
            ("mixamo", "Mixamo", "mixamorig: bones"),
            ("metarig", "Human Meta-Rig", "Blender's human meta-rig"),
            ("custom", "Custom", "Only the bone overrides"),
        ],
        default="auto",
    )
    overrides: StringProperty(
        name="Bone Overrides",
        description="Per keypoint: keypoint=Bone[:head|:tail|:0..1], separated by ';' "
        "(e.g. 'nose=Head:0.4; l_ear=EarL'; 'r_ear=' leaves a keypoint out)",
    )
    foreground: PointerProperty(
        name="Foreground",
        type=bpy.types.Collection,
        description="Objects masked as foreground for background smoothing; empty: all geometry",
    )


def _settings(item):
    return getattr(item, "scene_control", None)


def _source_scene(context, item):
    settings = _settings(item)
    return settings.scene if settings is not None and settings.scene else context.scene


def _scene_frames(context, item, start: int, frames: int) -> list[int]:
    """Scene frames for a job starting at timeline frame ``start`` (other scenes: their start)."""
    scene = _source_scene(context, item)
    first = start if scene == context.scene else scene.frame_start
    return list(range(first, first + frames))


def item_kind(item) -> str:
    """The scene pass of a ControlNet entry: depth, openpose, canny or lines."""
    kind = _PASS_KINDS.get(item.scene_pass)
    if kind is None:
        raise SceneControlError(f"unknown scene pass {item.scene_pass!r}")
    settings = _settings(item)
    if kind == "canny" and settings is not None and settings.edges == "FREESTYLE":
        return "lines"
    return kind


def item_characters(context, item) -> list[Character] | None:
    """The characters of an entry: armatures of its collection (or None: the scene's)."""
    settings = _settings(item)
    if settings is None:
        return None
    overrides = parse_overrides(settings.overrides)
    if settings.characters is not None:
        objects = [o for o in settings.characters.all_objects if o.type == "ARMATURE"]
        if not objects:
            raise SceneControlError(f"collection {settings.characters.name!r} has no armature")
    else:
        objects = [o for o in _source_scene(context, item).objects if o.type == "ARMATURE"]
        objects = [o for o in objects if not o.hide_render]
    return [Character(o.name, settings.preset, overrides) for o in objects] or None


def _shared_cache(folder: str | os.PathLike) -> Path:
    """The pass cache shared by jobs: beside the job's staging folder."""
    return _abs(folder).parent.parent / CACHE_FOLDER


def render_control(context, item, start: int, frames: int, width: int, height: int, folder) -> dict:
    """Add-on hook: render an entry's scene pass into folder; the job's control VideoInput."""
    scene = _source_scene(context, item)
    settings = _settings(item)
    camera = settings.camera if settings is not None else None
    kind = item_kind(item)
    characters = item_characters(context, item) if kind == "openpose" else None
    cache = _shared_cache(folder)
    path, _detector = render_scene_control(
        scene,
        folder,
        kind,
        _scene_frames(context, item, start, frames),
        width,
        height,
        camera,
        characters,
        cache,
    )
    prune_cache(cache, time.time() - CACHE_MAX_AGE_S)
    return {"path": str(path), "start": 0, "stride": 1.0}


def render_masks(context, item, start: int, frames: int, width: int, height: int, folder) -> dict:
    """Add-on hook: foreground masks for background smoothing; the job's masks VideoInput."""
    settings = _settings(item)
    foreground = None
    if settings is not None and settings.foreground is not None:
        foreground = list(settings.foreground.all_objects)
    paths = render_mask_frames(
        _source_scene(context, item),
        folder,
        _scene_frames(context, item, start, frames),
        width,
        height,
        foreground,
        settings.camera if settings is not None else None,
        cache=_shared_cache(folder),
    )
    return {"path": str(paths[0].parent), "start": 0, "stride": 1.0}


def draw_control_settings(layout, context, item) -> None:
    """Add-on hook: the entry's scene settings in the ControlNet panel."""
    settings = _settings(item)
    if settings is None:
        return
    layout.prop(settings, "scene")
    layout.prop(settings, "camera")
    if item.scene_pass == "OPENPOSE":
        layout.prop(settings, "characters")
        layout.prop(settings, "preset")
        layout.prop(settings, "overrides")
    elif item.scene_pass == "CANNY":
        layout.prop(settings, "edges")
    layout.prop(settings, "foreground")


def _item_class():
    from . import properties

    return properties.T2VZ_ControlNetItem


def register() -> None:
    """Register the settings and attach them to the add-on's ControlNet entries."""
    bpy.utils.register_class(T2VZ_SceneControlSettings)
    _item_class().scene_control = PointerProperty(type=T2VZ_SceneControlSettings)


def unregister() -> None:
    """Detach and unregister the settings."""
    item = _item_class()
    if hasattr(item, "scene_control"):
        del item.scene_control
    bpy.utils.unregister_class(T2VZ_SceneControlSettings)
