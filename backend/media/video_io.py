"""Frames in (image folders, movie files) and out (PNG frames, mp4), written atomically.

Input frames are RGB uint8 arrays (H, W, 3), scaled to cover the target size and centre-
cropped so proportions are kept. Output goes to a temporary folder beside the destination
that is renamed into place only when the job succeeds: an existing folder is never
overwritten and a failed or cancelled job leaves nothing behind.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from ..protocol import FITS, VideoInput, partial_name, sweep_stale_partials

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".exr")
MOVIE_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")


class VideoInputError(ValueError):
    """A video input is missing, unreadable or too short; the message names the path."""


class OutputExistsError(FileExistsError):
    """The output folder already exists; results never overwrite anything."""


# The most pixels an input image or movie frame may have: 8192 x 8192 (the largest job side
# is 4096, so twice that each way). A 389 KB PNG can claim 20000 x 20000 and decode to 1.6 GB;
# its size is read from the header and refused before anything is decoded.
MAX_INPUT_PIXELS = 8192 * 8192


def check_pixels(path: Path, width: int, height: int) -> None:
    """VideoInputError naming ``path`` when a frame of width x height is over the limit."""
    if width * height > MAX_INPUT_PIXELS:
        raise VideoInputError(
            f"{path} is {width}x{height} pixels; inputs are limited to {MAX_INPUT_PIXELS} "
            "pixels (8192x8192): scale it down first"
        )


def _image_header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) an image file's header claims, read without decoding; None when
    Pillow cannot tell (OpenEXR, a broken file: OpenCV's own limit then applies)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ours decides
            with Image.open(path) as image:
                return image.size
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours
        raise VideoInputError(
            f"{path} claims more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels; inputs are "
            f"limited to {MAX_INPUT_PIXELS} pixels (8192x8192)"
        ) from None
    except (OSError, ValueError, SyntaxError):
        return None


def frame_name(index: int) -> str:
    """File name of 0-based frame ``index``: frame_00001.png for the first frame."""
    return f"frame_{index + 1:05d}.png"


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def list_image_files(folder: Path) -> list[Path]:
    """Image files of a folder in natural order (frame2 before frame10)."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=_natural_key)


def source_indices(spec: VideoInput, frame_ids: Sequence[int]) -> dict[int, int]:
    """Source frame index read for each output frame: ``indices``, else start + floor(f * stride)."""
    if spec.indices is not None:
        beyond = [f for f in frame_ids if f >= len(spec.indices)]
        if beyond:
            raise VideoInputError(
                f"video input {spec.path} lists {len(spec.indices)} frame indices; "
                f"output frame {beyond[0] + 1} needs one more"
            )
        return {f: spec.indices[f] for f in frame_ids}
    return {f: spec.start + math.floor(f * spec.stride + 1e-9) for f in frame_ids}


def _to_rgb8(image: np.ndarray) -> np.ndarray:
    """Any decoded image (gray, BGR, BGRA; 8/16-bit or float) as RGB uint8."""
    if image.dtype == np.uint16:
        image = (image / 257.0).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 4:
        image = image[:, :, :3]
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def fit_frame(image: np.ndarray, width: int, height: int, fit: str = "crop") -> np.ndarray:
    """The image at (width, height): ``crop`` scales to cover and centre-crops, ``pad``
    scales to fit inside and centres it on black, ``stretch`` scales each side on its own."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    if fit == "stretch":
        shrink = width * height < w * h
        return cv2.resize(
            image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
        )
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    cover = fit == "crop"
    scale = max(width / w, height / h) if cover else min(width / w, height / h)
    if cover:
        new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    else:
        new_w, new_h = min(width, max(1, round(w * scale))), min(height, max(1, round(h * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    image = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    if cover:
        x0, y0 = (new_w - width) // 2, (new_h - height) // 2
        return image[y0 : y0 + height, x0 : x0 + width]
    canvas = np.zeros((height, width, *image.shape[2:]), dtype=image.dtype)
    x0, y0 = (width - new_w) // 2, (height - new_h) // 2
    canvas[y0 : y0 + new_h, x0 : x0 + new_w] = image
    return canvas


def frame_size(spec: VideoInput) -> tuple[int, int]:
    """(width, height) of the first frame ``spec`` reads (its start frame), without fitting."""
    path = Path(os.path.expanduser(spec.path))
    if path.is_dir():
        files = list_image_files(path)
        if not files:
            raise VideoInputError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        first = source_indices(spec, [0])[0]
        image = _read_image(files[min(first, len(files) - 1)])
    elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        image = _read_image(path)
    elif path.is_file():
        capture = cv2.VideoCapture(str(path))
        try:
            size = (
                int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            )
        finally:
            capture.release()
        if min(size) <= 0:
            raise VideoInputError(f"cannot open movie {path}")
        check_pixels(path, *size)
        return size
    else:
        raise VideoInputError(f"video input {path} does not exist")
    return image.shape[1], image.shape[0]


def _read_image(path: Path) -> np.ndarray:
    size = _image_header_size(path)
    if size is not None:
        check_pixels(path, *size)  # before decoding: a decompression bomb is never unpacked
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise VideoInputError(f"cannot read image {path}")
    return _to_rgb8(image)


def _iter_movie(path: Path, wanted: set[int]) -> Iterator[tuple[int, np.ndarray]]:
    """The movie's frames at the wanted frame numbers as Blender's sequencer shows them,
    yielded in order as they are decoded (one pass, front to back).

    Frame n of a movie is the picture on screen at time n / fps: the frame with the latest
    timestamp at or before ``start_time + round(n * ticks_per_frame)``, which is how
    Blender seeks (by timestamp). It is the n-th decoded frame when the timestamps are
    regular; with jittered or late timestamps (variable frame rate recordings) the n-th
    decoded frame can be one later than the picture on screen. Without PyAV, frames are
    counted in decoding order with OpenCV.
    """
    try:
        import av
    except ImportError:
        yield from _iter_movie_in_order(path, wanted)
        return
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoInputError(f"cannot open movie {path}: {exc}") from None
    with container:
        if not container.streams.video:
            raise VideoInputError(f"movie {path} has no video stream")
        stream = container.streams.video[0]
        check_pixels(path, stream.codec_context.width or 0, stream.codec_context.height or 0)
        rate = stream.guessed_rate or stream.average_rate
        if rate and stream.time_base is not None:
            try:
                yield from _iter_by_time(container, stream, path, wanted, rate)
                return
            except _RotatedMovie:
                pass  # OpenCV applies the rotation (as Blender does); PyAV does not
            except av.error.FFmpegError as exc:
                raise VideoInputError(f"cannot decode movie {path}: {exc}") from None
    yield from _iter_movie_in_order(path, wanted)


class _RotatedMovie(Exception):
    """The movie's frames carry a rotation (phone videos): read it with OpenCV instead."""


def _iter_by_time(
    container, stream, path: Path, wanted: set[int], rate
) -> Iterator[tuple[int, np.ndarray]]:
    """Each wanted frame number with the picture shown then, decoding once, front to back."""
    ticks_per_frame = 1 / (Fraction(rate) * Fraction(stream.time_base))
    start = stream.start_time or 0
    # The timestamp Blender looks for, for each frame number (C's round: half away from 0).
    targets = sorted((start + math.floor(n * ticks_per_frame + Fraction(1, 2)), n) for n in wanted)
    shown = None  # (end pts, frame) of the latest frame at or before the next target
    pending = count = 0
    for frame in container.decode(stream):
        count += 1
        if count == 1 and getattr(frame, "rotation", 0):
            raise _RotatedMovie  # before anything is yielded
        if frame.pts is None:
            continue
        while pending < len(targets) and targets[pending][0] < frame.pts:
            earlier = frame if shown is None else shown[1]
            yield targets[pending][1], earlier.to_ndarray(format="rgb24")
            pending += 1
        if pending == len(targets):
            return
        shown = (
            frame.pts + (getattr(frame, "duration", None) or math.ceil(ticks_per_frame)),
            frame,
        )
    # Targets after the last decoded frame: shown while they fall within its duration.
    while pending < len(targets) and shown is not None and targets[pending][0] < shown[0]:
        yield targets[pending][1], shown[1].to_ndarray(format="rgb24")
        pending += 1
    if pending < len(targets):
        raise VideoInputError(
            f"movie {path} has {count} frames; frame index {targets[pending][1]} is needed"
        )


def _iter_movie_in_order(path: Path, wanted: set[int]) -> Iterator[tuple[int, np.ndarray]]:
    """Decode the movie once, front to back, yielding the wanted frames as they come."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise VideoInputError(f"cannot open movie {path}")
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    try:
        check_pixels(path, width, height)
    except VideoInputError:
        capture.release()
        raise
    found: set[int] = set()
    last = max(wanted)
    index = 0
    try:
        while index <= last:
            ok, image = capture.read()
            if not ok:
                break
            if index in wanted:
                found.add(index)
                yield index, _to_rgb8(image)
            index += 1
    finally:
        capture.release()
    missing = sorted(wanted - found)
    if missing:
        raise VideoInputError(
            f"movie {path} has {index} frames; frame index {missing[0]} is needed"
        )


def iter_frames(
    spec: VideoInput, frame_ids: Sequence[int], width: int, height: int, fit: str = "crop"
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Fitted RGB uint8 frames (height, width, 3) of ``spec`` one at a time, in source order,
    each with the output ``frame_ids`` that show it: one full-size frame in memory at a time."""
    path = Path(os.path.expanduser(spec.path))
    users: dict[int, list[int]] = {}  # source index -> output frames showing it
    for f, i in source_indices(spec, frame_ids).items():
        users.setdefault(i, []).append(f)
    if path.is_dir():
        files = list_image_files(path)
        if not files:
            raise VideoInputError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        if max(users) >= len(files):
            raise VideoInputError(
                f"folder {path} has {len(files)} images; image index {max(users)} is needed"
            )
        for i in sorted(users):
            yield users[i], fit_frame(_read_image(files[i]), width, height, fit)
    elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        # One still image for every frame.
        still = fit_frame(_read_image(path), width, height, fit)
        yield [f for fs in users.values() for f in fs], still
    elif path.is_file():
        for i, image in _iter_movie(path, set(users)):
            yield users[i], fit_frame(image, width, height, fit)
    else:
        raise VideoInputError(f"video input {path} does not exist")


def read_frames(
    spec: VideoInput, frame_ids: Sequence[int], width: int, height: int, fit: str = "crop"
) -> dict[int, np.ndarray]:
    """RGB uint8 frames (height, width, 3) of ``spec`` for the 0-based output ``frame_ids``."""
    frames = {
        f: image for fs, image in iter_frames(spec, frame_ids, width, height, fit) for f in fs
    }
    return {f: frames[f] for f in frame_ids}


class FrameStore(Mapping[int, np.ndarray]):
    """Frames of one input at the job's size, spooled to a temporary file and read back per
    access, so a job holds one chunk of them in memory whatever the video length.

    The file is unlinked as it is made (POSIX; deleted on close elsewhere) and closes with
    the store: nothing is left behind. Reading a chunk back is a copy from the OS page
    cache, about a millisecond for eight 512x512 frames.
    """

    def __init__(self, width: int, height: int):
        self.shape = (height, width, 3)
        self._bytes = height * width * 3
        # Closed by close(), by ``with store:``, or when the store is dropped.
        self._file = tempfile.TemporaryFile(prefix="t2vz-frames-")  # noqa: SIM115
        self._slots: dict[int, int] = {}  # output frame -> slot in the file
        self._count = 0

    def add(self, frame_ids: Sequence[int], image: np.ndarray) -> None:
        """Store ``image`` (height, width, 3) uint8 as the frame of every one of ``frame_ids``."""
        if image.shape != self.shape or image.dtype != np.uint8:
            raise ValueError(f"frame must be uint8 {self.shape}, got {image.dtype} {image.shape}")
        self._file.seek(self._count * self._bytes)
        try:
            self._file.write(np.ascontiguousarray(image).tobytes())
        except OSError as exc:  # a full disk names no file: the spool file has no name
            folder = tempfile.gettempdir()
            raise OSError(
                exc.errno,
                f"could not spool input frames into the temporary folder {folder} "
                f"({exc.strerror or exc}); free space there or point TMPDIR elsewhere",
            ) from exc
        self._slots.update(dict.fromkeys(frame_ids, self._count))
        self._count += 1

    def __getitem__(self, frame: int) -> np.ndarray:
        out = np.empty(self.shape, np.uint8)
        self._file.seek(self._slots[frame] * self._bytes)
        if self._file.readinto(out.reshape(-1).data) != self._bytes:
            raise OSError("a spooled frame was cut short")
        return out

    def __contains__(self, frame: object) -> bool:
        return frame in self._slots  # without reading the frame

    def __iter__(self) -> Iterator[int]:
        return iter(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def close(self) -> None:
        """Close (and so delete) the spool file."""
        self._file.close()

    def __enter__(self) -> FrameStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spool_frames(
    items: Iterable[tuple[Sequence[int], np.ndarray]], width: int, height: int
) -> FrameStore:
    """A FrameStore holding each (frame indices, image) of ``items``; closed on failure."""
    store = FrameStore(width, height)
    try:
        for fs, image in items:
            store.add(fs, image)
    except BaseException:
        store.close()
        raise
    return store


def store_frames(
    spec: VideoInput, frame_ids: Sequence[int], width: int, height: int, fit: str = "crop"
) -> FrameStore:
    """``iter_frames`` of ``spec`` spooled into a FrameStore (each source frame once)."""
    return spool_frames(iter_frames(spec, frame_ids, width, height, fit), width, height)


def read_masks(
    spec: VideoInput, frame_ids: Sequence[int], width: int, height: int, fit: str = "crop"
) -> dict[int, np.ndarray]:
    """Foreground masks as float32 (height, width) in [0, 1]; white is foreground."""
    frames = read_frames(spec, frame_ids, width, height, fit)
    return {f: image.mean(axis=2, dtype=np.float32) / 255.0 for f, image in frames.items()}


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError of the block into one naming ``path`` and the cause (a full disk:
    "No space left on device"); a write error alone names neither."""
    try:
        yield
    except OSError as exc:
        cause = exc.strerror or str(exc) or type(exc).__name__
        raise OSError(exc.errno, f"cannot write {path}: {cause}") from exc


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``; an OSError names the path and the cause."""
    with writing(path), open(path, "wb") as f:
        f.write(data)


def write_png(path: Path, image: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG (encoded here, so a failed write says why)."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"cannot encode a PNG for {path}")
    write_file(path, encoded.tobytes())


def _h264_stream(container, fps: float, width: int, height: int):
    """An H.264 (yuv420p) video stream in a PyAV container: plays in browsers and players."""
    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "18", "preset": "medium"}  # visually lossless for previews
    return stream


def h264_available() -> bool:
    """True when PyAV and its bundled libx264 encoder can be used."""
    try:
        import av

        av.codec.Codec("libx264", "w")
    except Exception:  # noqa: BLE001 (missing package, or an FFmpeg build without libx264)
        return False
    return True


class Mp4Writer:
    """Streams RGB uint8 frames into an mp4 as they are decoded.

    H.264 (yuv420p) through PyAV's bundled FFmpeg; without it, OpenCV's mp4v (which many
    players and browsers refuse) with a log line saying so; without either, nothing is
    written and ``close`` returns None. Odd sizes are padded by one edge pixel (yuv420p
    needs even sides).
    """

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = Path(path), fps
        self.codec: str | None = None
        self._container = self._stream = self._cv_writer = None
        self._failed = False

    def _open(self, width: int, height: int) -> None:
        """Pick the encoder once the frame size is known."""
        if h264_available():
            import av

            self._container = av.open(str(self.path), "w", options={"movflags": "+faststart"})
            self._stream = _h264_stream(self._container, self.fps, width, height)
            self.codec = "h264"
            return
        log.warning(
            "PyAV with libx264 is not installed (pip install av): writing %s with OpenCV's "
            "mp4v codec, which browsers and many players refuse",
            self.path,
        )
        writer = cv2.VideoWriter(
            str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (width, height)
        )
        if writer.isOpened():
            self._cv_writer, self.codec = writer, "mp4v"
        else:
            log.warning("no mp4 encoder at all (neither PyAV nor OpenCV); skipping %s", self.path)
            self._failed = True

    def write(self, image: np.ndarray) -> None:
        """Append one RGB uint8 frame (height, width, 3)."""
        pad_h, pad_w = image.shape[0] % 2, image.shape[1] % 2
        if pad_h or pad_w:
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        if self.codec is None and not self._failed:
            self._open(image.shape[1], image.shape[0])
        if self._stream is not None:
            import av

            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        elif self._cv_writer is not None:
            self._cv_writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))

    def close(self) -> str | None:
        """Flush and close; the codec written ("h264", "mp4v") or None when nothing was."""
        if self._stream is not None:
            for packet in self._stream.encode():  # flush the encoder's delayed frames
                self._container.mux(packet)
            self._container.close()
            self._stream = None
        if self._cv_writer is not None:
            self._cv_writer.release()
            self._cv_writer = None
        return self.codec

    def abort(self) -> None:
        """Close without caring about the file (the staging folder is discarded)."""
        try:
            self.close()
        except Exception:  # noqa: BLE001 (a broken encoder must not hide the job's own error)
            log.debug("mp4 writer failed while aborting", exc_info=True)


def write_mp4(path: Path, frames: Sequence[Path], fps: float) -> bool:
    """Encode PNG frames into an mp4 (H.264 when available); False when nothing was written."""
    if not frames:
        return False
    writer = Mp4Writer(path, fps)
    try:
        for frame in frames:
            writer.write(_read_image(Path(frame)))
    except BaseException:
        writer.abort()
        raise
    return writer.close() is not None


def check_output_writable(out: Path) -> None:
    """Raise OSError naming the folder when no result can be written beside ``out``.

    Makes and removes a staging folder in the nearest folder that exists (where writing
    the result starts): only trying tells a read-only disk, a missing permission or a file
    in the way. Missing parent folders are not made here (the job makes them when it writes).
    """
    out = Path(out)
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    probe = existing / partial_name(out.name)
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        cause = exc.strerror or str(exc) or type(exc).__name__
        raise OSError(exc.errno, f"cannot write the result {out} in {existing}: {cause}") from exc


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed to ``out`` when the block succeeds."""
    out = Path(out)
    if out.is_symlink():
        raise OutputExistsError(
            f"output folder {out} is a symbolic link; results are never written through one"
        )
    if out.exists():
        raise OutputExistsError(f"output folder {out} already exists; results never overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in sweep_stale_partials(out.parent):
        log.info("removed %s: a partial result of a process that is gone", stale)
    staging = out.parent / partial_name(out.name)
    staging.mkdir()
    try:
        yield staging
        if os.path.lexists(out):
            raise OutputExistsError(f"output folder {out} appeared while the job ran; kept it")
        os.rename(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
