"""blender_t2vz/strips.py on its own: strip collections, frame mapping, inputs, result strips.

Movie frame mapping runs on stand-in strips whose fields are Blender's (frame_start,
frame_duration, handles, animation offsets, reversal, strobe, fps): the expected frames are
those the sequencer shows, as ``test_movie_frames.py`` measures them by rendering real
movies. Image sequences and result strips use real strips in headless Blender.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import bpy
import pytest
from conftest import color_strip, write_png

from blender_t2vz import strips


def movie(
    duration: int = 12,
    start: int = 1,
    handles: tuple[int, int] = (0, 0),
    fps: float = 24.0,
    scene_fps: tuple[float, float] = (24, 1.0),
    **fields,
) -> SimpleNamespace:
    """A movie strip stand-in: ``duration`` content frames from ``start``, trimmed by
    ``handles`` (frame offsets), on a timeline of ``scene_fps`` (fps, fps_base)."""
    values = {
        "name": "clip",
        "type": "MOVIE",
        "frame_start": start,
        "frame_duration": duration,
        "frame_final_start": start + handles[0],
        "frame_final_end": start + duration - handles[1],
        "animation_offset_start": 0,
        "animation_offset_end": 0,
        "use_reverse_frames": False,
        "strobe": 1.0,
        "fps": fps,
        "id_data": SimpleNamespace(
            render=SimpleNamespace(fps=scene_fps[0], fps_base=scene_fps[1]), library=None
        ),
        **fields,
    }
    values["frame_final_duration"] = values["frame_final_end"] - values["frame_final_start"]
    return SimpleNamespace(**values)


# ---------------------------------------------------------------------------- compat


def test_strip_collections_by_blender_version() -> None:
    new, old = (
        SimpleNamespace(strips="s", strips_all="sa"),
        SimpleNamespace(sequences="q", sequences_all="qa"),
    )
    assert (strips.top_strips(new), strips.every_strip(new)) == ("s", "sa")  # 4.5+, 5.0
    assert (strips.top_strips(old), strips.every_strip(old)) == ("q", "qa")  # 4.2


def test_active_strip_and_video_kinds() -> None:
    assert strips.active_strip(SimpleNamespace(sequence_editor=None)) is None
    editor = SimpleNamespace(active_strip="the strip")
    assert strips.active_strip(SimpleNamespace(sequence_editor=editor)) == "the strip"
    assert not strips.is_video_strip(None)
    assert [strips.is_video_strip(SimpleNamespace(type=t)) for t in ("MOVIE", "IMAGE")] == [
        True,
        True,
    ]
    assert not strips.is_video_strip(SimpleNamespace(type="COLOR"))


# ---------------------------------------------------------------------------- movie frames


def test_movie_frames_follow_handles_and_animation_offsets() -> None:
    assert strips.movie_indices(movie(), 12) == list(range(12))
    # test_movie_frames: a 12-frame movie, animation offsets 1 and 1, handles 2 and 3.
    trimmed = movie(duration=10, start=5, handles=(2, 3))
    trimmed.animation_offset_start = trimmed.animation_offset_end = 1
    assert strips.movie_indices(trimmed, 12) == [3, 4, 5, 6, 7]
    # Reversed, first frame trimmed: the last content frame first.
    assert strips.movie_indices(movie(handles=(1, 0), use_reverse_frames=True), 12) == list(
        range(10, -1, -1)
    )
    # Handles pulled out past the content hold its first and last frames.
    held = movie(duration=4, start=10)
    held.frame_final_start, held.frame_final_end = 8, 16
    assert strips.movie_indices(held, 4) == [0, 0, 0, 1, 2, 3, 3, 3]
    # Strobe 3: every third frame, each held three times.
    assert strips.movie_indices(movie(strobe=3.0), 12) == [0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 9, 9]
    empty = movie(duration=0, animation_offset_start=6, animation_offset_end=6)
    with pytest.raises(strips.StripInputError, match="'clip': its offsets leave no movie frames"):
        strips.movie_indices(empty, 12)


def test_movies_at_their_own_rate_show_the_sequencers_frames() -> None:
    # test_movie_frames, rendered: 30 fps and 12 fps movies of 12 frames on a 24 fps timeline
    # (Add Movie shortens the first to 9 frames and lengthens the second to 24).
    fast = movie(duration=9, fps=30.0)
    assert strips.movie_indices(fast, 12) == [0, 1, 3, 4, 5, 6, 8, 9, 10]
    slow = movie(duration=24, handles=(3, 0), fps=12.0)
    expected = [2, 2, 2, *(k for k in range(3, 12) for _ in (0, 1))]
    assert strips.movie_indices(slow, 12, cache_by_floor=True) == expected
    # Blender 4.5 (no floor-keyed cache) rounds 1.5, 2.0, 2.5, ... to 2, 2, 3, ...
    rounded = [*(k for k in range(2, 12) for _ in (0, 1)), 11]
    assert strips.movie_indices(slow, 12, cache_by_floor=False) == rounded
    running = expected if bpy.app.version >= (5, 0, 0) else rounded
    assert strips.movie_indices(slow, 12) == running
    # Reversed, a slowed strip meets each index's upper half first: 11.5 and 11 (held at
    # the last frame) show 11, then 10.5 and 10 show 11, 9.5 and 9 show 10, and so on.
    back = movie(duration=24, fps=12.0, use_reverse_frames=True)
    shown = [11, 11, *(k for k in range(11, 0, -1) for _ in "ab")]
    assert strips.movie_indices(back, 12, cache_by_floor=True) == shown
    # Without the cache: 11.5 and 11 show 11, 10.5 rounds up to 11, 10 shows 10, ..., 0.
    rounded_back = [11, *(k for k in range(11, 0, -1) for _ in "ab"), 0]
    assert strips.movie_indices(back, 12, cache_by_floor=False) == rounded_back
    # 59.94 fps on a 29.97 fps timeline (fps_base 1.001) reads every other frame.
    ntsc = movie(duration=6, fps=60000 / 1001, scene_fps=(30, 1.001))
    assert strips.movie_indices(ntsc, 12) == [0, 2, 4, 6, 8, 10]


def test_playback_rate_only_when_the_length_shows_it() -> None:
    # A strip whose length is the content's is played frame by frame, whatever the fps.
    assert strips._playback_rate(movie(fps=48.0), 12) == 1.0
    # Blender truncates content / rate: 12 frames at 5/4 of the scene rate last 9 frames.
    assert strips._playback_rate(movie(duration=9, fps=30.0), 12) == 1.25
    assert strips._playback_rate(movie(duration=10, fps=30.0), 12) == 1.25  # within a frame
    # Two frames off is a trimmed or stretched strip, not a rate.
    assert strips._playback_rate(movie(duration=8, fps=48.0), 12) == 1.0
    assert strips._playback_rate(movie(duration=6, fps=0.0), 12) == 1.0  # no fps known
    assert strips._playback_rate(movie(duration=6, fps=48.0), 0) == 1.0


def test_movie_input_is_start_and_stride_when_evenly_spaced() -> None:
    path = Path("/clips/a.mp4")
    assert strips.movie_input(path, [3]) == {"path": str(path), "start": 3, "stride": 1.0}
    assert strips.movie_input(path, [2, 4, 6]) == {"path": str(path), "start": 2, "stride": 2.0}
    for uneven in ([5, 4, 3], [4, 4, 4], [0, 0, 1, 1], [1, 2, 4]):
        assert strips.movie_input(path, uneven) == {"path": str(path), "indices": uneven}


# ---------------------------------------------------------------------------- inputs


def _images(scene, folder: Path, names: list[str], channel: int = 1, start: int = 1):
    strip = strips.top_strips(scene.sequence_editor).new_image(
        name="user images", filepath=str(folder / names[0]), channel=channel, frame_start=start
    )
    for name in names[1:]:
        strip.elements.append(name)
    return strip


def test_image_run_is_found_in_the_backends_natural_order(scene, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    for i in range(1, 13):
        write_png(folder / f"Shot{i}.png", 8, 8, (i, i, i))
    write_png(folder / "_cover.png", 8, 8, (0, 0, 0))  # "_" sorts before letters, lowercase
    write_png(folder / "a_notes.txt", 8, 8, (0, 0, 0))  # not an image type: not a frame
    strip = _images(scene, folder, ["Shot9.png", "Shot10.png", "shot11.PNG"])
    (folder / "Shot11.png").rename(folder / "shot11.PNG")
    # As the backend orders a folder: _cover, then Shot1 ... Shot9 (frame2 before frame10,
    # case aside), so the strip's run starts at index 9.
    assert strips.video_input(strip, tmp_path / "staging") == (
        {"path": str(folder.resolve()), "start": 9, "stride": 1.0},
        3,
    )
    assert not (tmp_path / "staging").exists()


def test_reversed_images_are_staged_in_the_order_shown(scene, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    for i in (1, 2, 3):
        write_png(folder / f"img_{i}.PNG", 8, 8, (i, i, i))
    strip = _images(scene, folder, ["img_1.PNG", "img_2.PNG", "img_3.PNG"])
    strip.use_reverse_frames = True
    video, frames = strips.video_input(strip, tmp_path / "staging")
    staged = Path(video["path"])
    assert (video["start"], video["stride"], frames) == (0, 1.0, 3)
    assert sorted(p.name for p in staged.iterdir()) == [f"frame_0000{i}.png" for i in (1, 2, 3)]
    for i, source in ((1, 3), (2, 2), (3, 1)):
        assert (staged / f"frame_0000{i}.png").read_bytes() == (
            folder / f"img_{source}.PNG"
        ).read_bytes()


def test_unusable_strips_are_refused_by_name(scene, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    write_png(folder / "a.png", 8, 8, (1, 1, 1))
    write_png(folder / "b.gif", 8, 8, (1, 1, 1))
    gif = _images(scene, folder, ["a.png", "b.gif"])
    with pytest.raises(strips.StripInputError, match=r"image type '\.gif' of 'b\.gif' is not"):
        strips.video_input(gif, tmp_path / "staging")
    missing = _images(scene, folder, ["a.png", "gone.png"], channel=2)
    with pytest.raises(strips.StripInputError, match="'user images.001': missing image .*gone"):
        strips.video_input(missing, tmp_path / "staging")
    editor = scene.sequence_editor
    colour = color_strip(editor, "title", channel=3, start=1, length=4)
    with pytest.raises(strips.StripInputError, match="movie or image sequence, got a color strip"):
        strips.video_input(colour, tmp_path)
    with pytest.raises(strips.StripInputError, match="movie or image sequence, got nothing"):
        strips.video_input(None, tmp_path)
    gone = movie(filepath=str(tmp_path / "gone.mp4"), retiming_keys=())
    with pytest.raises(strips.StripInputError, match="'clip': movie file not found: .*gone"):
        strips.video_input(gone, tmp_path)
    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(b"not a movie at all" * 64)
    broken = movie(filepath=str(garbage), retiming_keys=())
    with pytest.raises(
        strips.StripInputError, match="'clip': Blender cannot read the movie .*broken"
    ):
        strips.video_input(broken, tmp_path)


# ---------------------------------------------------------------------------- results


def _timeline(*spans: tuple[int, int, int]) -> SimpleNamespace:
    """An editor stand-in with strips (channel, first frame, end frame) in 4.5+ naming."""
    return SimpleNamespace(
        strips=[
            SimpleNamespace(channel=c, frame_final_start=s, frame_final_end=e) for c, s, e in spans
        ]
    )


def test_first_free_channel_skips_only_overlapping_strips() -> None:
    editor = _timeline((1, 1, 5), (2, 5, 9), (4, 1, 20))
    assert strips.first_free_channel(editor, 5, 9) == 1  # [1, 5) ends where the range starts
    assert strips.first_free_channel(editor, 1, 5) == 2  # [5, 9) starts where it ends
    assert strips.first_free_channel(editor, 4, 6) == 3
    assert strips.first_free_channel(editor, 4, 6, above=3) == 5
    assert strips.first_free_channel(editor, 30, 31, above=2) == 3
    full = _timeline(*((c, 1, 10) for c in range(1, strips.MAX_CHANNEL + 1)))
    assert strips.first_free_channel(full, 10, 12) == 1
    with pytest.raises(strips.StripInputError, match="no free channel above 0 for frames 1-4"):
        strips.first_free_channel(full, 1, 5)


def test_result_strip_carries_its_frames_and_job(scene, tmp_path: Path) -> None:
    scene.render.resolution_x, scene.render.resolution_y = 1920, 1080
    folder = tmp_path / "r"
    frames = [str(write_png(folder / f"frame_{i:05d}.png", 680, 384, (1, 2, 3))) for i in (1, 2)]
    job = {"width": 680, "height": 384, "prompt": "p", "seed": 2}
    strip = strips.add_result_strip(scene, frames, 3, 7, "my result", job)
    assert (strip.name, strip.channel, strip.frame_final_start) == ("my result", 3, 7)
    assert [e.filename for e in strip.elements] == ["frame_00001.png", "frame_00002.png"]
    assert strip[strips.JOB_PROPERTY] == json.dumps(job, sort_keys=True)
    assert strips.stored_job(strip) == job
    # Nearly the frame's aspect: filled (scaled to the width); without a size: fitted whole.
    assert strip.transform.scale_x == pytest.approx(1920 / 680, rel=1e-5)
    for other in ({"prompt": "p"}, {**job, "width": "680"}, {**job, "height": 0}):
        fitted = strips.add_result_strip(scene, frames[:1], 4, 20, "other", other)
        assert fitted.transform.scale_x == pytest.approx(1080 / 384, rel=1e-5)
    with pytest.raises(strips.StripInputError, match="the result has no frames"):
        strips.add_result_strip(scene, [], 5, 1, "none", job)
    elsewhere = str(write_png(tmp_path / "other" / "frame_00003.png", 8, 8, (1, 2, 3)))
    with pytest.raises(strips.StripInputError, match="not in one folder: .*other"):
        strips.add_result_strip(scene, [*frames, elsewhere], 5, 1, "split", job)


def test_stored_job_only_from_a_json_object() -> None:
    class Strip(dict):
        pass

    assert strips.stored_job(None) is None
    assert strips.stored_job(Strip()) is None
    assert strips.stored_job(Strip(t2vz_job=3)) is None
    assert strips.stored_job(Strip(t2vz_job="{not json")) is None
    assert strips.stored_job(Strip(t2vz_job="[1, 2]")) is None
    assert strips.stored_job(Strip(t2vz_job='{"seed": 4}')) == {"seed": 4}
