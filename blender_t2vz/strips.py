"""The sequencer side: reading inputs from strips and putting results on the timeline.

Blender 4.2 calls the strip collections ``sequences``/``sequences_all``, 4.5 has both
names and 5.0 only ``strips``/``strips_all``: ``top_strips`` and ``every_strip`` hide that.
Everything here uses the data API (``new_image``), never ``bpy.ops.sequencer``, which in
5.0 needs a workspace sequencer scene. User strips are only read, never changed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import bpy

from . import jobs, sizing

JOB_PROPERTY = "t2vz_job"
VIDEO_TYPES = {"MOVIE", "IMAGE"}
MAX_CHANNEL = 128
# The image types the backend reads from a folder (backend/media/video_io.py).
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


def source_strip(scene: Any) -> Any | None:
    """The strip Generate, Regenerate and Load Settings act on, one rule for all: the
    active strip when it is selected (or nothing is selected), else the one selected strip;
    None when several strips are selected and the active one is not among them."""
    editor = scene.sequence_editor
    if editor is None:
        return None
    active = editor.active_strip
    selected = [s for s in every_strip(editor) if s.select]
    if active is not None and (active.select or not selected):
        return active
    return selected[0] if len(selected) == 1 else None


def is_video_strip(strip: Any) -> bool:
    """True for the strips a job can read: movies and image sequences."""
    return strip is not None and strip.type in VIDEO_TYPES


# --------------------------------------------------------------------------- inputs


def _abspath(strip: Any, path: str) -> Path:
    library = getattr(strip.id_data, "library", None)
    return Path(bpy.path.abspath(path, library=library)).resolve()


def _source_frames(path: Path) -> int | None:
    """How many frames Blender finds in a movie file, or None if it cannot read it.

    Blender loads a file it cannot decode as a clip of no frames rather than failing.
    """
    try:
        clip = bpy.data.movieclips.load(str(path), check_existing=False)
    except RuntimeError:
        return None
    try:
        frames = int(clip.frame_duration)
    finally:
        bpy.data.movieclips.remove(clip)
    return frames if frames > 0 else None


def _playback_rate(strip: Any, content: int) -> float:
    """Source frames per timeline frame: the movie's fps over the scene's when it plays at
    its own rate (Add Movie's "Adjust Playback Rate", on by default), else 1.

    The Python API does not expose that setting; its trace is the strip's length, which
    Blender shortens (or lengthens) to ``content / rate`` frames, truncated.
    """
    render = strip.id_data.render
    scene_fps = render.fps / render.fps_base
    movie_fps = float(getattr(strip, "fps", 0.0) or 0.0)
    if content < 1 or movie_fps <= 0.0 or scene_fps <= 0.0:
        return 1.0
    rate = movie_fps / scene_fps
    length = int(strip.frame_duration)
    if length != content and abs(length - content / rate) < 1.0 + 1e-6:
        return rate
    return 1.0


# How the sequencer picks the frame of a slowed-down movie at a fractional index. Blender
# 5.0 decodes round(index) but caches it under floor(index), so playing forward shows the
# first frame decoded for each key; 4.5 decodes round(index) at every frame. Measured by
# rendering (tests/addon/test_movie_frames.py) on 5.0.1 and 4.5.15. 4.2 is taken to behave
# as 4.5: headless, its playback-rate flag cannot be set to check.
FRAME_CACHE_KEYED_BY_FLOOR = bpy.app.version >= (5, 0, 0)


def movie_indices(
    strip: Any, source_frames: int, cache_by_floor: bool = FRAME_CACHE_KEYED_BY_FLOOR
) -> list[int]:
    """The movie frame index the sequencer shows at each visible frame of a movie strip.

    Blender's own mapping, as the strip plays (or renders) from its first visible frame:
    frames since the strip's start (or before its end, reversed), times the playback rate,
    held within the strip's content, stepped by its strobe, then rounded (not floored),
    plus the animation offset at the start. ``cache_by_floor``: Blender 5.0's frame cache
    (``FRAME_CACHE_KEYED_BY_FLOOR``), which slowed strips show; see the comment below.
    """
    first = int(strip.animation_offset_start)
    content = source_frames - first - int(strip.animation_offset_end)
    if content < 1:
        raise StripInputError(f"strip {strip.name!r}: its offsets leave no movie frames")
    rate = _playback_rate(strip, content)
    strobe = float(getattr(strip, "strobe", 1.0) or 1.0)
    start = float(strip.frame_start)
    last = start + int(strip.frame_duration) - 1  # the content's last timeline frame
    reverse = bool(getattr(strip, "use_reverse_frames", False))
    out, decoded = [], {}
    for frame in range(int(strip.frame_final_start), int(strip.frame_final_end)):
        since = last - frame if reverse else frame - start
        index = min(max(since, 0.0) * rate, content - 1.0)
        if strobe > 1.0:
            index -= math.fmod(index, strobe)
        shown = math.floor(index + 0.5)  # rounded, halves up
        if cache_by_floor:  # 5.0 caches it under floor(index): the first decoded is shown
            shown = decoded.setdefault(math.floor(index), shown)
        out.append(first + shown)
    return out


def movie_input(path: Path, indices: list[int]) -> dict[str, Any]:
    """A VideoInput dict for these movie frames: start + stride when they are evenly spaced."""
    first = indices[0]
    steps = {b - a for a, b in zip(indices[:-1], indices[1:], strict=True)}
    if not steps:
        return {"path": str(path), "start": first, "stride": 1.0}
    if len(steps) == 1 and (step := steps.pop()) > 0:
        return {"path": str(path), "start": first, "stride": float(step)}
    return {"path": str(path), "indices": indices}


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

    Honours the strip's handles (frame offsets), its animation offsets, reversal, strobe
    and a playback rate that differs from the scene's (a 48 fps movie retimed onto a 24 fps
    timeline reads every other source frame): movie frames are those the sequencer shows
    (``movie_indices``). ``staging`` is a folder the add-on owns, used only when an image
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
    if len(getattr(strip, "retiming_keys", ())):
        raise StripInputError(
            f"strip {strip.name!r} has retiming keys, which the add-on cannot follow: "
            "reset its retiming, or render the strip to a movie and use that"
        )
    path = _abspath(strip, strip.filepath)
    if not path.is_file():
        raise StripInputError(f"strip {strip.name!r}: movie file not found: {path}")
    source_frames = _source_frames(path)
    if source_frames is None:
        raise StripInputError(f"strip {strip.name!r}: Blender cannot read the movie {path}")
    indices = movie_indices(strip, source_frames)
    return movie_input(path, indices), len(indices)


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


def result_channel(editor: Any, start: int, end: int, above: int = 0) -> int:
    """The channel a result in frames [start, end) is seen on: above channel ``above`` and
    above every strip it overlaps (the sequencer shows the highest channel on top)."""
    top = max(
        (
            s.channel
            for s in top_strips(editor)
            if s.frame_final_start < end and start < s.frame_final_end
        ),
        default=0,
    )
    channel = max(top, above) + 1
    if channel > MAX_CHANNEL:
        raise StripInputError(f"no channel above {max(top, above)} for frames {start}-{end - 1}")
    return channel


def select_only(editor: Any, strip: Any) -> None:
    """Make ``strip`` the active strip and the only selected one."""
    for other in every_strip(editor):
        other.select = False
    strip.select = True
    editor.active_strip = strip


# --------------------------------------------------------------------------- takes

# A result strip's take: the group of takes it belongs to (one per Generate, shared by its
# Regenerates) and its number in that group.
TAKE_GROUP_PROPERTY = "t2vz_take_group"
TAKE_PROPERTY = "t2vz_take"
# The strip a result was made from (pix2pix or strip-driven ControlNet), by name.
SOURCE_PROPERTY = "t2vz_source"
NAME_BYTES = 63  # Blender's strip names hold 63 bytes


def take_of(strip: Any) -> tuple[str, int]:
    """(group, number) of a result strip; ("", 0) for strips that are not takes."""
    if strip is None:
        return "", 0
    group, number = strip.get(TAKE_GROUP_PROPERTY), strip.get(TAKE_PROPERTY)
    if not isinstance(group, str) or not group or not isinstance(number, int):
        return "", 0
    return group, number


def takes(editor: Any, group: str) -> list[Any]:
    """The strips of take group ``group``, by take number."""
    if not group or editor is None:
        return []
    found = [s for s in every_strip(editor) if take_of(s)[0] == group]
    return sorted(found, key=lambda s: take_of(s)[1])


def take_name(name: str, number: int) -> str:
    """The strip name of take ``number``: the name itself for take 1, else "name take N"."""
    if number <= 1:
        return name
    suffix = f" take {number}".encode()
    base = name.encode("utf-8")[: NAME_BYTES - len(suffix)].decode("utf-8", errors="ignore")
    return base.rstrip() + suffix.decode()


def mark_take(strip: Any, group: str, number: int) -> None:
    """Record ``strip`` as take ``number`` of ``group``."""
    strip[TAKE_GROUP_PROPERTY] = group
    strip[TAKE_PROPERTY] = int(number)


def mute_other_takes(editor: Any, strip: Any) -> list[Any]:
    """Mute the other takes of ``strip``'s group that overlap it; the strips muted."""
    group = take_of(strip)[0]
    start, end = strip.frame_final_start, strip.frame_final_end
    muted = []
    for other in takes(editor, group):
        if other == strip or other.frame_final_start >= end or start >= other.frame_final_end:
            continue
        if not other.mute:
            other.mute = True
            muted.append(other)
    strip.mute = False
    return muted


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


def relative_directory(strip: Any, blend_path: str | None = None) -> bool:
    """Store a result strip's folder relative to the .blend (``blend_path``, default the
    open file) when it is saved and Blender's Relative Paths preference is on; True if
    changed. A folder on another drive stays absolute."""
    blend_path = bpy.data.filepath if blend_path is None else blend_path
    if not blend_path or not bpy.context.preferences.filepaths.use_relative_paths:
        return False
    if strip.directory.startswith("//"):
        return False
    folder = bpy.path.abspath(strip.directory)
    try:
        relative = "//" + os.path.relpath(folder, os.path.dirname(blend_path))
    except ValueError:
        return False
    strip.directory = relative.rstrip("/\\") + "/"
    return True


def _relative_to(path: str, blend_path: str) -> str:
    """``path`` as Blender writes a path relative to the .blend (``//``); unchanged when it
    cannot be (another drive)."""
    try:
        return "//" + os.path.relpath(path, os.path.dirname(blend_path))
    except ValueError:
        return path


def relative_job(strip: Any, blend_path: str | None = None) -> bool:
    """Store the input paths of a result strip's job (its source video, control videos
    and masks) as Blender stores its own paths on a save to ``blend_path`` (default the
    open file): new ones relative when the Relative Paths preference is on, relative ones
    remapped when the file is saved into another folder. True if changed."""
    job = stored_job(strip)
    blend_path = bpy.data.filepath if blend_path is None else blend_path
    if job is None or not blend_path:
        return False
    current = bpy.data.filepath  # what ``//`` means until the save
    use_relative = bpy.context.preferences.filepaths.use_relative_paths

    def convert(path: str) -> str:
        if path.startswith("//"):
            if not current or os.path.dirname(current) == os.path.dirname(blend_path):
                return path
            path = os.path.normpath(bpy.path.abspath(path, start=os.path.dirname(current)))
        elif not use_relative:
            return path
        return _relative_to(path, blend_path)

    mapped = jobs.map_input_paths(job, convert)
    if mapped == job:
        return False
    strip[JOB_PROPERTY] = json.dumps(mapped, sort_keys=True)
    return True


def absolute_inputs(strip: Any, job: dict[str, Any]) -> dict[str, Any]:
    """``job``, a result strip's, with its ``//`` input paths made absolute (the backend
    reads absolute ones); a missing input is a StripInputError naming the strip and path,
    e.g. a source left behind when the project folder moved."""
    library = getattr(strip.id_data, "library", None)

    def convert(path: str) -> str:
        if path.startswith("//"):
            path = os.path.normpath(bpy.path.abspath(path, library=library))
        if not os.path.exists(path):
            raise StripInputError(
                f"strip {strip.name!r}: its job reads {path}, which is missing (was it moved "
                "out of the project folder?)"
            )
        return path

    return jobs.map_input_paths(job, convert)


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
