"""Movie strips: the frames the add-on sends are the frames the sequencer shows.

Movies are written here with Blender's own FFmpeg output (H.264 in .mp4, .mkv and .mov,
32x32, 12 frames, frame k a flat grey of 20 + 20 k, so every frame is identifiable after
compression); one more, with late timestamps, is written by PyAV in another process. The
sequencer is rendered headless at every frame of a strip and compared with the frames the
backend reads for the add-on's VideoInput (``strips.video_input``), read in another
process so PyAV and OpenCV stay out of Blender's.
"""

import ctypes
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import bpy
import pytest
from conftest import BACKEND_PYTHON, color_strip

from blender_t2vz import strips

PROBE = str(Path(__file__).with_name("movie_probe.py"))
FRAMES, SIZE = 12, 32
GREYS = [20 + 20 * k for k in range(FRAMES)]
SCENE_FPS = 24
# Strip flags (DNA_sequence_types.h): one the Python API sets, and "Adjust Playback Rate".
FLIP_X, AUTO_PLAYBACK_RATE = 1 << 11, 1 << 17


def _frame_number(level: float) -> int:
    """Which movie frame a grey level belongs to."""
    return min(range(FRAMES), key=lambda k: abs(GREYS[k] - level))


def _render_settings(scene, fps: int) -> None:
    render = scene.render
    render.resolution_x = render.resolution_y = SIZE
    render.resolution_percentage = 100
    render.fps, render.fps_base = fps, 1.0
    render.use_file_extension = False
    scene.view_settings.view_transform = "Standard"


def write_movie(folder: Path, container: str, suffix: str, fps: int) -> Path:
    """A 12-frame H.264 movie written by Blender: a render of 12 one-frame colour strips."""
    source = bpy.data.scenes.new("t2vz_movie_source")
    try:
        _render_settings(source, fps)
        source.frame_start, source.frame_end = 1, FRAMES
        editor = source.sequence_editor_create()
        for k in range(FRAMES):
            strip = color_strip(editor, f"grey {k}", 1, 1 + k, 1)
            strip.color = (GREYS[k] / 255,) * 3
        settings = source.render.image_settings
        if hasattr(settings, "media_type"):  # Blender 5.0+
            settings.media_type = "VIDEO"
        settings.file_format = "FFMPEG"
        source.render.ffmpeg.format = container
        source.render.ffmpeg.codec = "H264"
        source.render.ffmpeg.constant_rate_factor = "HIGH"
        path = folder / f"grey_{fps}fps{suffix}"
        source.render.filepath = str(path)
        with bpy.context.temp_override(scene=source):
            bpy.ops.render.render(animation=True)
    finally:
        bpy.data.scenes.remove(source)
    assert path.is_file(), path
    return path


@pytest.fixture(scope="module")
def movies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("movies")
    made = {
        suffix: write_movie(folder, container, suffix, SCENE_FPS)
        for container, suffix in (("MPEG4", ".mp4"), ("MKV", ".mkv"), ("QUICKTIME", ".mov"))
    }
    made["30fps.mov"] = write_movie(folder, "QUICKTIME", ".mov", 30)
    made["12fps.mp4"] = write_movie(folder, "MPEG4", ".mp4", 12)
    made["late.mkv"] = folder / "late timestamps.mkv"
    subprocess.run([BACKEND_PYTHON, PROBE, "late-mkv", str(made["late.mkv"])], check=True)
    return made


@pytest.fixture
def timeline():
    """An empty scene at 24 fps and 32x32 to put strips in; removed afterwards."""
    scene = bpy.data.scenes.new("t2vz_movie_timeline")
    _render_settings(scene, SCENE_FPS)
    scene.sequence_editor_create()
    yield scene
    bpy.data.scenes.remove(scene)


def add_movie(scene, path: Path, start: int = 1, channel: int = 1):
    return strips.top_strips(scene.sequence_editor).new_movie(
        name=path.name, filepath=str(path), channel=channel, frame_start=start
    )


def play_at_movie_rate(strip) -> None:
    """Turn on "Adjust Playback Rate", as Add Movie does in the UI (on by default).

    The Python API cannot set it; the strip's flag word is found by toggling a flag the
    API can set (Flip X) and watching which 32-bit word of the strip changes.
    """
    words = (ctypes.c_uint32 * 64).from_address(strip.as_pointer())
    before = list(words)
    strip.use_flip_x = True
    after = list(words)
    strip.use_flip_x = False
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert len(changed) == 1 and after[changed[0]] ^ before[changed[0]] == FLIP_X, changed
    words[changed[0]] |= AUTO_PLAYBACK_RATE


def shown(scene, strip) -> list[int]:
    """The movie frame the sequencer shows at each visible frame of the strip."""
    out = []
    path = Path(bpy.app.tempdir or "/tmp") / "t2vz_sequencer_frame.png"
    settings = scene.render.image_settings
    if hasattr(settings, "media_type"):
        settings.media_type = "IMAGE"
    settings.file_format = "PNG"
    scene.render.filepath = str(path)
    for frame in range(strip.frame_final_start, strip.frame_final_end):
        # The render operator renders the context scene's frame: set both.
        with bpy.context.temp_override(scene=scene):
            scene.frame_set(frame)
            bpy.ops.render.render(write_still=True)
        image = bpy.data.images.load(str(path), check_existing=False)
        try:
            centre = (SIZE // 2 * SIZE + SIZE // 2) * 4
            level = image.pixels[centre] * 255
        finally:
            bpy.data.images.remove(image)
        out.append(_frame_number(level))
    path.unlink(missing_ok=True)
    return out


def sent(specs: list[tuple[dict, int]], tmp_path: Path) -> list[list[int]]:
    """The movie frames the backend reads for each (VideoInput dict, frame count)."""
    specs_file = tmp_path / "specs.json"
    specs_file.write_text(json.dumps([{"spec": s, "frames": n} for s, n in specs]))
    result = subprocess.run(
        [BACKEND_PYTHON, PROBE, "read", str(specs_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    levels = json.loads(result.stdout.strip().splitlines()[-1])
    return [[_frame_number(v) for v in frame_levels] for frame_levels in levels]


def compare(scene, strip_list, tmp_path: Path) -> list[tuple[list[int], list[int]]]:
    """(shown by the sequencer, read by the backend) for each strip."""
    inputs = [strips.video_input(s, tmp_path / "staging") for s in strip_list]
    backend = sent(inputs, tmp_path)
    for strip in strip_list:
        strip.mute = True
    pairs = []
    for strip, frames in zip(strip_list, backend, strict=True):
        strip.mute = False
        pairs.append((shown(scene, strip), frames))
        strip.mute = True
    return pairs


def test_mp4_mkv_mov_frames_are_the_frames_the_sequencer_shows(movies, timeline, tmp_path):
    plain = [
        add_movie(timeline, movies[s], 1, c) for c, s in enumerate((".mp4", ".mkv", ".mov"), 1)
    ]
    # Trimmed by its handles and its animation offsets, later on the timeline.
    trimmed = add_movie(timeline, movies[".mkv"], 5, 4)
    trimmed.animation_offset_start, trimmed.animation_offset_end = 1, 1
    trimmed.frame_offset_start, trimmed.frame_offset_end = 2, 3
    reversed_ = add_movie(timeline, movies[".mp4"], 3, 5)
    reversed_.use_reverse_frames = True
    reversed_.frame_offset_start = 1
    pairs = compare(timeline, [*plain, trimmed, reversed_], tmp_path)
    for strip, (on_screen, read) in zip([*plain, trimmed, reversed_], pairs, strict=True):
        assert read == on_screen, strip.name
    assert pairs[0][0] == list(range(FRAMES))
    assert pairs[3][0] == [3, 4, 5, 6, 7]  # 10 frames after the offsets, handles 2 and 3
    assert pairs[4][0] == list(range(10, -1, -1))


def test_movies_played_at_their_own_rate(movies, timeline, tmp_path):
    """A 30 fps and a 12 fps movie on a 24 fps timeline, as Add Movie puts them there."""
    fast = add_movie(timeline, movies["30fps.mov"], 1, 1)
    slow = add_movie(timeline, movies["12fps.mp4"], 1, 2)
    for strip in (fast, slow):
        play_at_movie_rate(strip)
    if (fast.frame_duration, slow.frame_duration) == (FRAMES, FRAMES) and bpy.app.version < (4, 5):
        pytest.skip("Blender before 4.5 does not take the flag set this way")
    assert (fast.frame_duration, slow.frame_duration) == (9, 24)  # Blender took the rate
    slow.frame_offset_start = 3
    (fast_shown, fast_read), (slow_shown, slow_read) = compare(timeline, [fast, slow], tmp_path)
    # Blender rounds (timeline frames since the start) x (movie fps / scene fps) ...
    assert fast_shown == [0, 1, 3, 4, 5, 6, 8, 9, 10]
    # ... and 5.0 caches the decoded frame under the index floored: played forward, the slow
    # strip shows 2 for 1.5, 2.0 and 2.5, then 3 for 3.0 and 3.5. 4.5 rounds each (halves
    # up) and shows 2, 2, 3, 3, ...: the add-on reads what the running Blender shows.
    if bpy.app.version >= (5, 0, 0):
        assert slow_shown == [2, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11]
    else:
        assert slow_shown == [2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 11]
    assert fast_read == fast_shown
    assert slow_read == slow_shown


def test_late_timestamps_show_the_earlier_frame_and_the_backend_reads_it(
    movies, timeline, tmp_path
):
    """Blender seeks by timestamp: a frame stamped after its slot is shown one slot late."""
    strip = add_movie(timeline, movies["late.mkv"], 1, 1)
    ((on_screen, read),) = compare(timeline, [strip], tmp_path)
    assert on_screen == [0, 0, *range(1, 11)]  # decoded frame k-1 at timeline frame k
    assert read == on_screen


def test_retiming_keys_are_refused_not_misread(movies, timeline, tmp_path):
    """Blender's API cannot add retiming keys headless; a stand-in strip carries two."""
    strip = add_movie(timeline, movies[".mp4"])
    keyed = SimpleNamespace(
        **{name: getattr(strip, name) for name in ("name", "type", "frame_final_duration")},
        retiming_keys=[object(), object()],
    )
    with pytest.raises(strips.StripInputError, match="has retiming keys"):
        strips.video_input(keyed, tmp_path)
    assert strips.video_input(strip, tmp_path)[1] == FRAMES
