"""Control images rendered from the 3D scene: depth, OpenPose keypoints, edges and masks.

Runs inside Blender (bpy, mathutils, and the numpy Blender bundles for pixel arrays; never
torch, diffusers or cv2). Everything renders on a temporary scene that links the user's
objects, so the user's render settings are never touched, and the temporary scene is
removed afterwards whatever happens.

One module per pass:

* ``depth``: Cycles at one sample writes the Z pass into a multilayer OpenEXR, read here;
  frames become inverse depth, near bright, normalised over the whole shot (MiDaS-like).
* ``openpose``: armature bones (``openpose.presets``: which bone is which keypoint)
  projected through the camera into the OpenPose COCO-18 layout (``openpose.keypoints``),
  written as keypoint JSON (``{"format": "openpose18", "frames": ...}``) that the backend
  draws; keypoints behind the camera or outside the frame are left out (null).
* ``edges``: a Workbench flat-shaded pass the backend runs canny on ("canny"), or
  Freestyle lines rendered as a pass, white on black ("lines").
* ``masks``: foreground masks (white) for background smoothing, from the alpha and Z passes.
* ``vectors``: Blender's Vector pass (exact screen-space motion, rendered with the Z pass)
  as the folder of ``.npy`` frames a job with consistency "flow" reads as ``flow_source``.

and the parts they share: ``passes`` (the raw Z / lines / flat renders), ``cache`` (rendered
passes cached under ``<folder>/cache`` by a hash of what affects them: frame, camera,
evaluated object transforms and geometry, settings), ``scene`` (temporary scenes and
renders), ``exr`` (the OpenEXR reader), ``files`` (PNG and JSON output), ``controls`` (a
job's ``controlnets`` from ``SceneControl`` entries) and ``addon`` (the panel settings and
the hooks the add-on's operators call).
"""

from .addon import (
    CACHE_FOLDER,
    CACHE_MAX_AGE_S,
    T2VZ_SceneControlSettings,
    draw_control_settings,
    item_characters,
    item_kind,
    parse_overrides,
    register,
    render_control,
    render_flow,
    render_masks,
    scene_frames,
    unregister,
)
from .cache import CACHE_VERSION, cache_dir, prune_cache, scene_state_key
from .controls import KINDS, SceneControl, build_scene_controls, render_scene_control
from .depth import DEPTH_FLOOR, normalize_depth, render_depth_frames
from .edges import edge_method, render_edge_frames
from .errors import SceneControlError
from .exr import exr_pass, read_exr
from .files import write_png
from .masks import foreground_mask, render_mask_frames
from .openpose import (
    KEYPOINT_NAMES,
    MIN_AUTO_KEYPOINTS,
    POSE_FORMAT,
    PRESET_ITEMS,
    PRESETS,
    BonePoint,
    Character,
    bone_point_world,
    detect_preset,
    keypoint_frames,
    mixamo_prefix,
    parse_override,
    person_keypoints,
    pose_preview,
    project_point,
    resolve_bone_map,
    scene_characters,
    write_pose_json,
)
from .passes import BACKGROUND_Z, PASSES, render_pass_frames
from .scene import temporary_scene
from .vectors import render_flow_frames, render_vector_frames, vector_flow

__all__ = [
    "BACKGROUND_Z",
    "CACHE_FOLDER",
    "CACHE_MAX_AGE_S",
    "CACHE_VERSION",
    "DEPTH_FLOOR",
    "KEYPOINT_NAMES",
    "KINDS",
    "MIN_AUTO_KEYPOINTS",
    "PASSES",
    "POSE_FORMAT",
    "PRESETS",
    "PRESET_ITEMS",
    "BonePoint",
    "Character",
    "SceneControl",
    "SceneControlError",
    "T2VZ_SceneControlSettings",
    "bone_point_world",
    "build_scene_controls",
    "cache_dir",
    "detect_preset",
    "draw_control_settings",
    "edge_method",
    "exr_pass",
    "foreground_mask",
    "item_characters",
    "item_kind",
    "keypoint_frames",
    "mixamo_prefix",
    "normalize_depth",
    "parse_override",
    "parse_overrides",
    "person_keypoints",
    "pose_preview",
    "project_point",
    "prune_cache",
    "read_exr",
    "register",
    "render_control",
    "render_depth_frames",
    "render_edge_frames",
    "render_flow",
    "render_flow_frames",
    "render_mask_frames",
    "render_masks",
    "scene_frames",
    "render_pass_frames",
    "render_scene_control",
    "render_vector_frames",
    "resolve_bone_map",
    "scene_characters",
    "scene_state_key",
    "temporary_scene",
    "unregister",
    "vector_flow",
    "write_png",
    "write_pose_json",
]
