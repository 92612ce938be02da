"""backend/media/video_io.py: reading frames (folders, stills, movies), fitting, atomic output."""

from __future__ import annotations

import logging
import re
import sys
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

import backend.media.video_io as video_io
from backend.media.video_io import (
    FrameStore,
    Mp4Writer,
    OutputExistsError,
    VideoInputError,
    fit_frame,
    frame_name,
    h264_available,
    iter_frames,
    list_image_files,
    read_frames,
    read_masks,
    source_indices,
    staged_output,
    store_frames,
    write_mp4,
    write_png,
)
from backend.protocol import VideoInput


def solid(value: int | tuple[int, int, int], w: int = 32, h: int = 32) -> np.ndarray:
    """An RGB uint8 image of one colour."""
    rgb = (value,) * 3 if isinstance(value, int) else value
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (h, w, 3)).copy()


def gray_sequence(folder: Path, count: int, w: int = 32, h: int = 32) -> Path:
    """``count`` PNGs img_0.png ... where image i is gray level 10 * i."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        write_png(folder / f"img_{i}.png", solid(10 * i, w, h))
    return folder


def levels(frames: dict[int, np.ndarray]) -> dict[int, int]:
    return {f: int(round(float(img.mean()))) for f, img in frames.items()}


def test_frame_names_are_one_based() -> None:
    assert frame_name(0) == "frame_00001.png"
    assert frame_name(41) == "frame_00042.png"


def test_image_folders_sort_naturally(tmp_path: Path) -> None:
    for name in ("frame10.png", "frame2.png", "Frame3.PNG", "frame1.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "frame0.png").mkdir()  # a folder is not an image
    assert [p.name for p in list_image_files(tmp_path)] == [
        "frame1.jpg",
        "frame2.png",
        "Frame3.PNG",
        "frame10.png",
    ]


@pytest.mark.parametrize(
    ("start", "stride", "frames", "expected"),
    [
        (0, 1.0, [0, 1, 2], [0, 1, 2]),
        (2, 2.0, [0, 1, 2], [2, 4, 6]),
        (0, 0.5, [0, 1, 2, 3], [0, 0, 1, 1]),
        (5, 1.0, [3, 7], [8, 12]),
        (0, 0.29, [100], [29]),  # 0.29 * 100 is 28.999... in floating point
    ],
)
def test_start_and_stride_map_output_to_source_frames(
    start: int, stride: float, frames: list[int], expected: list[int]
) -> None:
    spec = VideoInput("x", start=start, stride=stride)
    assert source_indices(spec, frames) == dict(zip(frames, expected, strict=True))


def test_listed_indices_replace_start_and_stride(tmp_path: Path) -> None:
    spec = VideoInput("x", start=5, stride=3.0, indices=[4, 4, 1])
    assert source_indices(spec, [0, 1, 2]) == {0: 4, 1: 4, 2: 1}
    with pytest.raises(VideoInputError, match="lists 3 frame indices; output frame 4"):
        source_indices(spec, [3])
    folder = gray_sequence(tmp_path / "seq", 5)
    assert levels(read_frames(VideoInput(str(folder), indices=[3, 0, 3]), [0, 1, 2], 32, 32)) == {
        0: 30,
        1: 0,
        2: 30,
    }


def test_read_folder_with_start_and_stride(tmp_path: Path) -> None:
    folder = gray_sequence(tmp_path / "seq", 7)
    frames = read_frames(VideoInput(str(folder), start=1, stride=2.0), [0, 1, 2], 64, 48)
    assert levels(frames) == {0: 10, 1: 30, 2: 50}
    assert all(img.shape == (48, 64, 3) and img.dtype == np.uint8 for img in frames.values())


def test_read_errors_name_the_input(tmp_path: Path) -> None:
    folder = gray_sequence(tmp_path / "seq", 3)
    with pytest.raises(VideoInputError, match="has 3 images; image index 3"):
        read_frames(VideoInput(str(folder), start=1), [0, 1, 2], 32, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoInputError, match="holds no images"):
        read_frames(VideoInput(str(tmp_path / "empty")), [0], 32, 32)
    with pytest.raises(VideoInputError, match="does not exist"):
        read_frames(VideoInput(str(tmp_path / "nothing")), [0], 32, 32)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(VideoInputError, match="cannot read image"):
        read_frames(VideoInput(str(broken)), [0], 32, 32)


def test_a_still_image_serves_every_frame(tmp_path: Path) -> None:
    still = tmp_path / "still.png"
    write_png(still, solid(77))
    frames = read_frames(VideoInput(str(still), start=3, stride=2.0), [0, 5, 9], 32, 32)
    assert levels(frames) == {0: 77, 5: 77, 9: 77}


def test_colour_channels_bit_depth_and_alpha(tmp_path: Path) -> None:
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    red = read_frames(VideoInput(str(tmp_path / "red.png")), [0], 8, 8)[0]
    assert red[0, 0].tolist() == [255, 0, 0]

    deep = np.full((8, 8), 65535, np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    assert (
        read_frames(VideoInput(str(tmp_path / "deep.png")), [0], 8, 8)[0][0, 0].tolist()
        == [255] * 3
    )

    bgra = np.zeros((8, 8, 4), np.uint8)
    bgra[..., 0] = 200  # blue, with alpha 0
    cv2.imwrite(str(tmp_path / "alpha.png"), bgra)
    assert read_frames(VideoInput(str(tmp_path / "alpha.png")), [0], 8, 8)[0][0, 0].tolist() == [
        0,
        0,
        200,
    ]


# --------------------------------------------------------------------------- movies


@pytest.fixture
def movie(tmp_path: Path) -> Path:
    """A 6-frame mp4 written with OpenCV: frame i is gray level 40 * i."""
    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 8.0, (64, 64))
    if not writer.isOpened():
        pytest.skip("this OpenCV build has no mp4v encoder")
    for i in range(6):
        writer.write(solid(40 * i, 64, 64))
    writer.release()
    return path


def test_read_movie_with_start_and_stride(movie: Path) -> None:
    frames = read_frames(VideoInput(str(movie), start=1, stride=2.0), [0, 1, 2], 32, 32)
    got = levels(frames)
    for frame, expected in {0: 40, 1: 120, 2: 200}.items():
        assert abs(got[frame] - expected) <= 6, got  # mp4 is lossy
    assert frames[0].shape == (32, 32, 3)


def test_movie_frames_are_read_by_timestamp_as_blender_shows_them(tmp_path: Path) -> None:
    """Frame n is the picture on screen at n / fps, not the n-th decoded frame.

    Millisecond timestamps 1 ms late on every frame but the first (like a variable frame
    rate recording): Blender's sequencer shows decoded frame n-1 at frame n
    (tests/addon/test_movie_frames.py renders it), and so must the backend.
    """
    av = pytest.importorskip("av")
    path = tmp_path / "late.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for k in range(6):
            frame = av.VideoFrame.from_ndarray(solid(40 * k), format="rgb24")
            frame.pts, frame.time_base = round(k * 1000 / 30) + (1 if k else 0), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    got = levels(read_frames(VideoInput(str(path)), range(6), 32, 32))
    shown = [0, 0, 1, 2, 3, 4]  # decoded frame k-1 at frame k
    assert all(abs(got[n] - 40 * k) <= 6 for n, k in enumerate(shown)), got


def test_movie_too_short(movie: Path) -> None:
    with pytest.raises(
        VideoInputError, match=f"^movie {re.escape(str(movie))} has 6 frames; frame index 7"
    ):
        read_frames(VideoInput(str(movie), start=3, stride=2.0), [0, 1, 2], 32, 32)


class FakeFrame:
    """A decoded PyAV frame: its timestamp and a gray picture of level ``pts``."""

    def __init__(self, pts: int) -> None:
        self.pts, self.duration, self.rotation = pts, None, 0

    def to_ndarray(self, format: str) -> np.ndarray:
        assert format == "rgb24"
        return solid(self.pts)


def test_a_frame_wanted_before_the_first_decoded_picture_shows_that_picture() -> None:
    """A stream whose first decodable picture comes after its start time (a recording cut
    between keyframes): frames before it show it, as they show the latest picture later."""

    class Stream:
        start_time, time_base = 0, Fraction(1, 30)  # 30 fps: frame n at pts n

    class Container:
        def decode(self, stream: Stream) -> list[FakeFrame]:
            return [FakeFrame(pts) for pts in (2, 3, 4)]

    frames = video_io._iter_by_time(Container(), Stream(), Path("cut.mp4"), {0, 1, 3}, 30)
    shown = {n: int(image[0, 0, 0]) for n, image in frames}
    assert shown == {0: 2, 1: 2, 3: 3}  # pictures by their pts


def test_frame_size_is_that_of_the_start_frame_unfitted(tmp_path: Path) -> None:
    folder = tmp_path / "seq"
    folder.mkdir()
    for i, (w, h) in enumerate([(32, 32), (48, 24), (40, 20)]):
        write_png(folder / f"img_{i}.png", solid(10, w, h))
    assert video_io.frame_size(VideoInput(str(folder), start=1)) == (48, 24)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoInputError, match=r"folder .*empty holds no images \(\.png, "):
        video_io.frame_size(VideoInput(str(tmp_path / "empty")))
    path = tmp_path / "wide.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 8.0, (48, 32))
    if not writer.isOpened():
        pytest.skip("this OpenCV build has no mp4v encoder")
    writer.write(solid(40, 48, 32))
    writer.release()
    assert video_io.frame_size(VideoInput(str(path))) == (48, 32)
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"\x00" * 64)
    with pytest.raises(VideoInputError, match=f"^cannot open movie {re.escape(str(fake))}$"):
        video_io.frame_size(VideoInput(str(fake)))


def test_unreadable_movie(tmp_path: Path) -> None:
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"\x00" * 64)
    with pytest.raises(VideoInputError, match="fake.mp4"):
        read_frames(VideoInput(str(fake)), [0], 32, 32)


# --------------------------------------------------------------------------- fitting


def test_fit_frame_covers_and_centre_crops_wide_images() -> None:
    image = np.zeros((50, 100, 3), np.uint8)
    image[:, :25] = (255, 0, 0)
    image[:, 25:75] = (0, 255, 0)
    image[:, 75:] = (0, 0, 255)
    out = fit_frame(image, 64, 64)
    assert out.shape == (64, 64, 3)
    # Scaled to 128x64 and cropped to the middle: only the green middle band is left.
    inner = out[:, 2:-2].reshape(-1, 3).astype(int)
    assert (np.abs(inner - [0, 255, 0]) <= 8).all()


def test_fit_frame_crops_tall_images_vertically() -> None:
    image = np.zeros((120, 40, 3), np.uint8)
    image[:30] = 255  # top quarter white
    image[90:] = 255  # bottom quarter white
    out = fit_frame(image, 40, 40)  # no scaling: crop rows 40..80
    assert out.shape == (40, 40, 3) and out.max() == 0


def test_fit_frame_downscales_and_keeps_exact_sizes() -> None:
    big = np.full((200, 300, 3), 90, np.uint8)
    out = fit_frame(big, 64, 32)
    assert out.shape == (32, 64, 3) and int(out.mean()) == 90
    same = np.zeros((32, 64, 3), np.uint8)
    assert fit_frame(same, 64, 32) is same


def marked_wide_frame() -> np.ndarray:
    """A 160x90 (16:9) grey frame with a red band on its left 16 columns and a green band on
    its right 16 columns: what survives of the sides tells crop, pad and stretch apart."""
    image = np.full((90, 160, 3), 128, np.uint8)
    image[:, :16] = (255, 0, 0)
    image[:, -16:] = (0, 255, 0)
    return image


@pytest.mark.parametrize("size", [(64, 64), (48, 64)])
def test_crop_fit_loses_the_sides_of_a_wide_input(size: tuple[int, int]) -> None:
    out = fit_frame(marked_wide_frame(), *size, fit="crop")
    assert out.shape == (size[1], size[0], 3)
    assert (out == 128).all()  # covered and centre-cropped: only the grey middle is left


def test_pad_fit_keeps_the_whole_input_on_black_bars() -> None:
    out = fit_frame(marked_wide_frame(), 64, 64, fit="pad")
    assert out.shape == (64, 64, 3)
    # 160x90 scaled by 0.4 -> 64x36, centred: 14 black rows above and below.
    assert (out[:14] == 0).all() and (out[50:] == 0).all()
    band = out[14:50]
    assert (band[:, 0] == (255, 0, 0)).all() and (band[:, -1] == (0, 255, 0)).all()
    assert (band[:, 32] == 128).all()


def test_stretch_fit_keeps_the_sides_and_fills_the_frame() -> None:
    out = fit_frame(marked_wide_frame(), 64, 64, fit="stretch")
    assert out.shape == (64, 64, 3)
    assert (out[:, 0] == (255, 0, 0)).all() and (out[:, -1] == (0, 255, 0)).all()
    assert not (out == 0).all(axis=2).any()  # no black bars
    # The red band keeps its share of the width: 16/160 of 64 columns, about 6.
    red_columns = int((out[32] == (255, 0, 0)).all(axis=1).sum())
    assert 5 <= red_columns <= 7


def textured(w: int, h: int) -> np.ndarray:
    """Random RGB pixels: every resampling filter gives other values on it."""
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("source", "size", "interpolation"),
    [
        ((160, 90), (64, 48), cv2.INTER_AREA),  # fewer pixels: area averaging, no aliasing
        ((40, 30), (64, 48), cv2.INTER_CUBIC),  # more pixels: cubic
        ((100, 40), (64, 64), cv2.INTER_CUBIC),  # narrower but taller, 4000 -> 4096 pixels
    ],
)
def test_stretch_resamples_with_area_only_when_the_frame_shrinks(
    source: tuple[int, int], size: tuple[int, int], interpolation: int
) -> None:
    image = textured(*source)
    out = fit_frame(image, *size, fit="stretch")
    assert np.array_equal(out, cv2.resize(image, size, interpolation=interpolation))
    other = cv2.INTER_CUBIC if interpolation == cv2.INTER_AREA else cv2.INTER_AREA
    assert not np.array_equal(out, cv2.resize(image, size, interpolation=other))


@pytest.mark.parametrize(
    ("fit", "source", "scaled", "interpolation"),
    [
        ("crop", (300, 200), (64, 43), cv2.INTER_AREA),  # scale 64/300 < 1
        ("pad", (30, 20), (64, 43), cv2.INTER_CUBIC),  # scale 64/30 > 1
    ],
)
def test_crop_and_pad_resample_with_area_only_when_scaling_down(
    fit: str, source: tuple[int, int], scaled: tuple[int, int], interpolation: int
) -> None:
    image = textured(*source)
    resized = cv2.resize(image, scaled, interpolation=interpolation)  # 64 x 42.67 -> 64 x 43
    out = fit_frame(image, 64, 32 if fit == "crop" else 64, fit=fit)
    if fit == "crop":  # rows 5..37 of 43, centred
        assert np.array_equal(out, resized[5:37])
    else:  # rows 10..53 of 64, centred on black
        assert np.array_equal(out[10:53], resized) and not out[:10].any() and not out[53:].any()


def test_fit_reaches_reading_and_unknown_fits_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    write_png(path, marked_wide_frame())
    spec = VideoInput(str(path))
    assert video_io.frame_size(spec) == (160, 90)
    for fit in ("crop", "pad", "stretch"):
        frames = video_io.read_frames(spec, [0, 1], 64, 64, fit)
        assert np.array_equal(frames[0], fit_frame(marked_wide_frame(), 64, 64, fit))
    with pytest.raises(ValueError, match="fit must be one of crop, pad, stretch, got 'zoom'"):
        fit_frame(marked_wide_frame(), 64, 64, fit="zoom")


def test_masks_are_float_foreground_fractions(tmp_path: Path) -> None:
    folder = tmp_path / "masks"
    folder.mkdir()
    write_png(folder / "m1.png", solid(255))
    write_png(folder / "m2.png", solid(0))
    masks = read_masks(VideoInput(str(folder)), [0, 1], 16, 16)
    assert masks[0].dtype == np.float32 and masks[0].shape == (16, 16)
    assert masks[0].min() == 1.0 and masks[1].max() == 0.0


# --------------------------------------------------------------------------- writing


def test_png_and_mp4_writing(tmp_path: Path) -> None:
    image = np.zeros((16, 24, 3), np.uint8)
    image[..., 0] = 200
    write_png(tmp_path / "a.png", image)
    assert np.array_equal(
        cv2.cvtColor(cv2.imread(str(tmp_path / "a.png")), cv2.COLOR_BGR2RGB), image
    )
    with pytest.raises(OSError):
        write_png(tmp_path / "missing" / "b.png", image)

    paths = []
    for i in range(3):
        paths.append(tmp_path / frame_name(i))
        write_png(paths[-1], solid(60 * i, 64, 64))
    assert write_mp4(tmp_path / "video.mp4", paths, fps=8)
    capture = cv2.VideoCapture(str(tmp_path / "video.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    capture.release()
    assert write_mp4(tmp_path / "none.mp4", [], fps=8) is False


def test_mp4_is_h264_yuv420p_with_every_frame(tmp_path: Path) -> None:
    av = pytest.importorskip("av", reason="PyAV (backend/requirements.txt) writes H.264")
    path = tmp_path / "video.mp4"
    writer = Mp4Writer(path, fps=12.5)
    for i in range(5):
        writer.write(solid((50 * i, 200 - 40 * i, 128), 64, 48))
    assert writer.close() == "h264"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.width, stream.height) == (64, 48)
        assert stream.average_rate == Fraction(25, 2)
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 5
    for i, image in enumerate(decoded):  # lossy, but every frame is the one written
        assert np.abs(image.astype(int) - solid((50 * i, 200 - 40 * i, 128), 64, 48)).mean() < 4


def test_odd_sizes_are_padded_to_even_for_yuv420p(tmp_path: Path) -> None:
    av = pytest.importorskip("av", reason="PyAV (backend/requirements.txt) writes H.264")
    writer = Mp4Writer(tmp_path / "odd.mp4", fps=8)
    writer.write(solid(90, 33, 17))
    assert writer.close() == "h264"
    with av.open(str(tmp_path / "odd.mp4")) as container:
        assert (container.streams.video[0].width, container.streams.video[0].height) == (34, 18)


def test_without_pyav_the_mp4_falls_back_to_opencv_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    assert not h264_available()
    writer = Mp4Writer(tmp_path / "video.mp4", fps=8)
    with caplog.at_level(logging.WARNING, logger="backend.media.video_io"):
        writer.write(solid(100, 64, 64))
        codec = writer.close()
    assert "pip install av" in caplog.text and "mp4v" in caplog.text
    if codec is None:
        assert "no mp4 encoder" in caplog.text
    else:
        assert codec == "mp4v"
        fourcc = int(cv2.VideoCapture(str(tmp_path / "video.mp4")).get(cv2.CAP_PROP_FOURCC))
        assert fourcc.to_bytes(4, "little") in (b"mp4v", b"FMP4")  # MPEG-4 part 2


def test_staged_output_renames_into_place(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "result"
    with staged_output(out) as staging:
        assert staging.parent == out.parent and staging != out and not out.exists()
        (staging / "frame_00001.png").write_bytes(b"x")
    assert sorted(p.name for p in out.iterdir()) == ["frame_00001.png"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["result"]


def test_staged_output_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "result"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError), staged_output(out):
        pytest.fail("the block must not run")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert (out / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_staged_output_cleans_up_on_error(tmp_path: Path) -> None:
    out = tmp_path / "result"
    with pytest.raises(RuntimeError, match="failed"), staged_output(out) as staging:
        (staging / "frame_00001.png").write_bytes(b"half")
        raise RuntimeError("failed")
    assert list(tmp_path.iterdir()) == []


def test_staged_output_keeps_a_folder_that_appeared_meanwhile(tmp_path: Path) -> None:
    out = tmp_path / "result"
    with pytest.raises(OutputExistsError, match="appeared"), staged_output(out) as staging:
        (staging / "frame_00001.png").write_bytes(b"new")
        out.mkdir()
        (out / "theirs.txt").write_text("other job")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_frames_are_read_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only one source frame is decoded per step of the iteration: never the whole video."""
    folder = gray_sequence(tmp_path / "seq", 6)
    reads: list[Path] = []
    real_read = video_io._read_image
    monkeypatch.setattr(video_io, "_read_image", lambda path: reads.append(path) or real_read(path))
    frames = iter_frames(VideoInput(str(folder), stride=0.5), range(6), 16, 16)
    users, image = next(frames)
    assert len(reads) == 1 and users == [0, 1] and image.shape == (16, 16, 3)
    assert [users for users, _ in frames] == [[2, 3], [4, 5]]
    assert len(reads) == 3  # each source frame once, though two output frames show it


def test_frame_store_reads_back_what_read_frames_gives(tmp_path: Path) -> None:
    folder = gray_sequence(tmp_path / "seq", 5, w=40, h=24)
    spec = VideoInput(str(folder), start=1, stride=0.5)
    held = read_frames(spec, [0, 1, 2, 5], 32, 16)
    with store_frames(spec, [0, 1, 2, 5], 32, 16) as store:
        assert sorted(store) == [0, 1, 2, 5] and 3 not in store and len(store) == 4
        for f, image in held.items():
            np.testing.assert_array_equal(store[f], image)
        assert store[1] is not store[1]  # a fresh array per access: nothing kept in memory
        size = store._file.seek(0, 2)
        assert size == 3 * 32 * 16 * 3  # source frames 1, 2 and 3, each written once
    with pytest.raises(ValueError, match="uint8"):
        FrameStore(8, 8).add([0], np.zeros((8, 8, 3), np.float32))


def test_a_full_temporary_folder_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spool file is unlinked, so the OS error of a full disk names no path: the store
    names the temporary folder (and TMPDIR) instead."""
    import errno
    import tempfile

    store = FrameStore(4, 4)

    def full(data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_file", _WriteFails(store._file, full))
    with pytest.raises(OSError, match="No space left on device") as caught:
        store.add([0], np.zeros((4, 4, 3), np.uint8))
    assert caught.value.errno == errno.ENOSPC
    assert f"temporary folder {tempfile.gettempdir()}" in str(caught.value)
    assert "TMPDIR" in str(caught.value) and len(store) == 0
    store.close()


class _WriteFails:
    """A file whose writes go to ``write``; everything else to the real file."""

    def __init__(self, file, write):
        self._real, self.write = file, write

    def __getattr__(self, name: str):
        return getattr(self._real, name)


# --------------------------------------------------------------------------- hostile files


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims width x height (what a decompression bomb shows
    before its compressed rows)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [9000, 20000, 60000])
def test_images_over_the_pixel_limit_are_refused_from_their_header(
    tmp_path: Path, side: int
) -> None:
    bomb = png_header_only(tmp_path / f"bomb{side}.png", side, side)
    for read in (
        lambda: video_io.frame_size(VideoInput(str(bomb))),
        lambda: read_frames(VideoInput(str(bomb)), [0], 64, 64),
    ):
        with pytest.raises(VideoInputError) as info:
            read()
        text = str(info.value)
        assert str(bomb) in text and str(video_io.MAX_INPUT_PIXELS) in text
        assert len(text.splitlines()) == 1


def test_an_image_at_the_pixel_limit_is_read(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(video_io, "MAX_INPUT_PIXELS", 32 * 32)
    cv2.imwrite(str(tmp_path / "ok.png"), solid(100))
    assert video_io.frame_size(VideoInput(str(tmp_path / "ok.png"))) == (32, 32)
    cv2.imwrite(str(tmp_path / "big.png"), solid(100, 33, 32))
    with pytest.raises(VideoInputError, match="33x32"):
        video_io.frame_size(VideoInput(str(tmp_path / "big.png")))


def test_staged_output_refuses_a_dangling_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "evil_result"
    link = tmp_path / "out"
    link.symlink_to(target)  # dangling: the target does not exist
    with pytest.raises(OutputExistsError, match="symbolic link"), staged_output(link):
        pass
    assert not target.exists() and not target.parent.exists()
    assert link.is_symlink()


def test_movies_over_the_pixel_limit_are_refused_before_decoding(
    movie: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(video_io, "MAX_INPUT_PIXELS", 63 * 64)  # the clip is 64x64
    for read in (
        lambda: video_io.frame_size(VideoInput(str(movie))),
        lambda: read_frames(VideoInput(str(movie)), [0], 32, 32),  # PyAV
    ):
        with pytest.raises(VideoInputError, match="64x64 pixels") as info:
            read()
        assert str(movie) in str(info.value)
    monkeypatch.setitem(sys.modules, "av", None)  # OpenCV's reader, without PyAV
    with pytest.raises(VideoInputError, match=str(63 * 64)):
        read_frames(VideoInput(str(movie)), [0], 32, 32)
