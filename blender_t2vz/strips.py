"""The sequencer side: reading inputs from strips and putting results on the timeline.

Blender 4.2 calls the strip collections ``sequences``/``sequences_all``, 4.5 has both
names and 5.0 only ``strips``/``strips_all``: ``top_strips`` and ``every_strip`` hide that.
Everything here uses the data API (``new_image``), never ``bpy.ops.sequencer``, which in
5.0 needs a workspace sequencer scene. User strips are only read, never changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import bpy

from . import sizing

JOB_PROPERTY = "t2vz_job"
VIDEO_TYPES = {"MOVIE", "IMAGE"}
MAX_CHANNEL = 128
# The image types the backend reads from a folder (backend/video_io.py).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".exr")


class StripInputError(ValueError):
    """A strip cannot serve as the job's input; the message names the strip."""


# --------------------------------------------------------------------------- compat


def top_strips(editor: Any) -> Any:
    """The editor's top-level strip collection (``strips`` in 4.5+, ``sequences`` in 4.2)."""
    strips = getattr(editor, "strips", None)
    return strips if strips is not None else editor.sequences


def every_strip(editor: Any) -> Any:
    """All strips, inside metas too (``strips_all`` in 4.5+, ``sequences_all`` in 4.2)."""
    strips = getattr(editor, "strips_all", None)
    return strips if strips is not None else editor.sequences_all


def active_strip(scene: Any) -> Any | None:
    """The scene's active strip, or None."""
    editor = scene.sequence_editor
    return editor.active_strip if editor is not None else None


def is_video_strip(strip: Any) -> bool:
    """True for the strips a job can read: movies and image sequences."""
    return strip is not None and strip.type in VIDEO_TYPES


# --------------------------------------------------------------------------- inputs


def _abspath(strip: Any, path: str) -> Path:
    library = getattr(strip.id_data, "library", None)
    return Path(bpy.path.abspath(path, library=library)).resolve()


def _movie_stride(strip: Any, path: Path) -> float:
    """Source frames per timeline frame: not 1 when the strip was retimed to the scene's fps."""
    try:
        clip = bpy.data.movieclips.load(str(path), check_existing=False)
    except RuntimeError:
        return 1.0
    try:
        source = clip.frame_duration
    finally:
        bpy.data.movieclips.remove(clip)
    used = source - strip.animation_offset_start - strip.animation_offset_end
    content = strip.frame_duration
    if used < 1 or content < 1:
        return 1.0
    stride = used / content
    return 1.0 if abs(stride - 1.0) < 0.01 else stride


def _natural_key(name: str) -> list:
    # The backend's order for a folder of frames: frame2 before frame10.
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _image_sequence(strip: Any, staging: Path) -> dict[str, Any]:
    """The strip's visible images as a folder (+ start), staged when they are not a run."""
    directory = _abspath(strip, strip.directory)
    start, end = strip.frame_final_start, strip.frame_final_end
    names = []
    for frame in range(start, end):
        element = strip.strip_elem_from_frame(frame)
        if element is None:
            raise StripInputError(f"strip {strip.name!r}: no image at frame {frame}")
        names.append(element.filename)
    for name in dict.fromkeys(names):
        if not (directory / name).is_file():
            raise StripInputError(f"strip {strip.name!r}: missing image {directory / name}")
        if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            raise StripInputError(
                f"strip {strip.name!r}: image type {Path(name).suffix!r} of {name!r} is not "
                f"supported (use {', '.join(IMAGE_EXTENSIONS)})"
            )
    listing = sorted(
        (
            p.name
            for p in directory.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        ),
        key=_natural_key,
    )
    if names and names[0] in listing:
        first = listing.index(names[0])
        if listing[first : first + len(names)] == names:
            return {"path": str(directory), "start": first, "stride": 1.0}
    # Held, reversed, strobed or sparse sequences: a folder with exactly the shown frames.
    staging.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names, start=1):
        source = directory / name
        target = staging / f"frame_{i:05d}{source.suffix.lower()}"
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    return {"path": str(staging), "start": 0, "stride": 1.0}


def video_input(strip: Any, staging: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """A VideoInput dict for the strip's visible frames, and how many frames that is.

    Honours the strip's handles (frame offsets), its animation offsets and a playback rate
    that differs from the scene's (a 48 fps movie retimed onto a 24 fps timeline reads every
    other source frame). ``staging`` is a folder the add-on owns, used only when an image
    sequence must be re-laid out.
    """
    if not is_video_strip(strip):
        kind = "nothing" if strip is None else f"a {strip.type.lower()} strip"
        raise StripInputError(f"the active strip must be a movie or image sequence, got {kind}")
    frames = int(strip.frame_final_duration)
    if frames < 1:
        raise StripInputError(f"strip {strip.name!r} shows no frames")
    if strip.type == "IMAGE":
        return _image_sequence(strip, Path(staging)), frames
    if getattr(strip, "use_reverse_frames", False):
        raise StripInputError(f"strip {strip.name!r}: reversed movie strips are not supported")
    path = _abspath(strip, strip.filepath)
    if not path.is_file():
        raise StripInputError(f"strip {strip.name!r}: movie file not found: {path}")
    stride = _movie_stride(strip, path)
    skipped = int(strip.frame_final_start - int(strip.frame_start))
    start = int(strip.animation_offset_start) + int(round(skipped * stride))
    return {"path": str(path), "start": start, "stride": stride}, frames


# --------------------------------------------------------------------------- results


def first_free_channel(editor: Any, start: int, end: int, above: int = 0) -> int:
    """The lowest channel above ``above`` with no strip in frames [start, end)."""
    busy = {
        s.channel
        for s in top_strips(editor)
        if s.frame_final_start < end and start < s.frame_final_end
    }
    for channel in range(above + 1, MAX_CHANNEL + 1):
        if channel not in busy:
            return channel
    raise StripInputError(f"no free channel above {above} for frames {start}-{end - 1}")


def add_result_strip(
    scene: Any,
    frame_paths: list[str],
    channel: int,
    start: int,
    name: str,
    job: dict[str, Any],
) -> Any:
    """A new image-sequence strip of ``frame_paths`` carrying ``job`` as JSON text."""
    if not frame_paths:
        raise StripInputError("the result has no frames")
    paths = [Path(p) for p in frame_paths]
    folder = paths[0].parent
    for p in paths:
        if p.parent != folder:
            raise StripInputError(f"result frames are not in one folder: {p}")
    editor = scene.sequence_editor_create()
    # Scaled by Blender's own fit so the result covers the scene's frame like other footage.
    render = scene.render
    width, height = job.get("width"), job.get("height")
    fit = "FIT"
    if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
        fit = sizing.fit_method(width, height, render.resolution_x, render.resolution_y)
    strip = top_strips(editor).new_image(
        name=name, filepath=str(paths[0]), channel=channel, frame_start=start, fit_method=fit
    )
    for p in paths[1:]:
        strip.elements.append(p.name)
    strip[JOB_PROPERTY] = json.dumps(job, sort_keys=True)
    return strip


def stored_job(strip: Any) -> dict[str, Any] | None:
    """The job a result strip was made with, or None for any other strip."""
    if strip is None:
        return None
    text = strip.get(JOB_PROPERTY)
    if not isinstance(text, str):
        return None
    try:
        job = json.loads(text)
    except ValueError:
        return None
    return job if isinstance(job, dict) else None
