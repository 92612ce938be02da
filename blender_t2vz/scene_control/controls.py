"""Job controls: the passes a job's scene ControlNets need, as ``controlnets`` dicts."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .cache import cache_dir, prune_cache
from .depth import render_depth_frames
from .edges import render_edge_frames
from .errors import SceneControlError
from .files import _abs, _check_frames
from .masks import render_mask_frames
from .openpose import Character, keypoint_frames, scene_characters, write_pose_json
from .scene import _check_size

KINDS = ("depth", "openpose", "canny", "lines", "edges")


@dataclass
class SceneControl:
    """One ControlNet driven by a pass rendered from the scene."""

    kind: str
    model: str
    weight: float = 1.0
    # openpose only; empty: every armature in the scene with the "auto" preset.
    characters: list[Character] = field(default_factory=list)


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
        paths = render_depth_frames(
            scene, folder, frames, width, height, camera, cache=cache, allow_empty=False
        )
        return paths[0].parent, "none"
    if kind == "openpose":
        people = keypoint_frames(scene, frames, width, height, characters, camera)
        if not any(people):
            # A pose file with no person on any frame controls nothing: say why instead.
            names = ", ".join(repr(c.armature) for c in characters or scene_characters(scene))
            raise SceneControlError(
                f"no keypoint of armature {names} is in the camera's view at frames "
                f"{frames[0]} to {frames[-1]}; the pose control would be empty"
            )
        return write_pose_json(_abs(folder) / "pose.json", people), "none"
    if kind in ("canny", "lines", "edges"):
        paths, detector = render_edge_frames(
            scene, folder, frames, width, height, kind, camera, cache=cache, allow_empty=False
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
