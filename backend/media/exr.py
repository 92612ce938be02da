"""A reader for the OpenEXR files Blender writes a Vector pass to, in numpy and the stdlib.

Scanline OpenEXR, single part or multipart (Blender 5's multilayer files hold one part a
pass), channels in half or float, compression None, RLE, ZIPS or ZIP (Blender's default);
the lossy and wavelet codecs (PIZ, PXR24, B44, DWA) and tiled or deep files are refused
with how to save instead. Sizes come from the header and are checked before anything is
decoded; each chunk is read on its own, so memory stays at the channels asked for.

OpenCV's own OpenEXR decoder is off unless OPENCV_IO_ENABLE_OPENEXR is set before its
first use in the process (disabled upstream over security issues in the bundled library,
opencv/opencv#21326), cannot pick a layer of a multilayer file and drops channels not
named R, G, B, A; this reader needs none of that.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAGIC = b"v/1\x01"
MAX_HEADER_BYTES = 1 << 20  # Blender's headers are about 1 KB a part
_TYPES = {0: np.dtype("<u4"), 1: np.dtype("<f2"), 2: np.dtype("<f4")}
_CODECS = {0: "None", 1: "RLE", 2: "ZIPS", 3: "ZIP", 4: "PIZ", 5: "PXR24", 6: "B44"}
_CODECS.update({7: "B44A", 8: "DWAA", 9: "DWAB", 10: "HTJ2K256", 11: "HTJ2K32"})
_LINES = {0: 1, 1: 1, 2: 1, 3: 16}  # scanlines a chunk holds, for the codecs read here
_TILED, _LONG_NAMES, _DEEP, _MULTIPART = 0x200, 0x400, 0x800, 0x1000


class ExrError(ValueError):
    """An OpenEXR file this reader cannot or will not decode; the message says why."""


class Part:
    """One part's header: its channels (name -> pixel type), data window and codec."""

    def __init__(self, attrs: dict[str, bytes]):
        self.attrs = attrs
        self.name = attrs.get("name", b"").decode("utf-8", "replace")
        self.channels = _channel_list(_need(attrs, "channels"))
        x0, y0, x1, y1 = struct.unpack("<4i", _need(attrs, "dataWindow")[:16])
        self.x0, self.y0 = x0, y0
        self.width, self.height = x1 - x0 + 1, y1 - y0 + 1
        self.compression = _need(attrs, "compression")[0]

    @property
    def chunks(self) -> int:
        """Chunks in the offset table: ``chunkCount`` where given, else from the height."""
        if "chunkCount" in self.attrs:
            return struct.unpack("<i", self.attrs["chunkCount"][:4])[0]
        lines = _LINES.get(self.compression, 1)
        return -(-self.height // lines)


def _need(attrs: dict[str, bytes], name: str) -> bytes:
    """A header attribute OpenEXR requires; ExrError when it is missing."""
    if name not in attrs:
        raise ExrError(f"the header has no {name} attribute")
    return attrs[name]


def _channel_list(data: bytes) -> dict[str, int]:
    """name -> pixel type of a ``chlist`` attribute (subsampled channels refused)."""
    out, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        end = data.index(b"\0", pos)
        name = data[pos:end].decode("utf-8", "replace")
        kind, _linear, xs, ys = struct.unpack_from("<iB3xii", data, end + 1)
        if kind not in _TYPES:
            raise ExrError(f"channel {name!r} has unknown pixel type {kind}")
        if (xs, ys) != (1, 1):
            raise ExrError(f"channel {name!r} is subsampled ({xs}x{ys}); save it at full size")
        out[name] = kind
        pos = end + 1 + 16
    return out


def _attributes(buf: bytes, pos: int) -> tuple[dict[str, bytes], int]:
    """The attributes of one header starting at ``pos`` and the offset after its end byte."""
    attrs: dict[str, bytes] = {}
    while buf[pos] != 0:
        end = buf.index(b"\0", pos)
        name = buf[pos:end].decode("utf-8", "replace")
        end = buf.index(b"\0", end + 1)  # the attribute's type name
        (size,) = struct.unpack_from("<i", buf, end + 1)
        if size < 0 or end + 5 + size > len(buf):
            raise ExrError(f"attribute {name!r} runs past the header")
        attrs[name] = buf[end + 5 : end + 5 + size]
        pos = end + 5 + size
    return attrs, pos + 1


def read_header(buf: bytes) -> tuple[list[Part], int, bool]:
    """The parts of an OpenEXR file from its first bytes, the offset after the headers, and
    whether it is multipart; ExrError for tiled, deep or truncated headers."""
    if buf[:4] != MAGIC:
        raise ExrError("not an OpenEXR file (no OpenEXR magic number)")
    (version,) = struct.unpack_from("<I", buf, 4)
    if version & (_TILED | _DEEP):
        raise ExrError("tiled or deep OpenEXR is not supported; save scanline images")
    multipart = bool(version & _MULTIPART)
    parts, pos = [], 8
    try:
        while True:
            attrs, pos = _attributes(buf, pos)
            if not attrs:
                break  # the empty header that ends a multipart file's headers
            parts.append(Part(attrs))
            if not multipart:
                break
    except ExrError:
        raise
    except (IndexError, ValueError, struct.error) as exc:
        raise ExrError(f"the header is truncated or malformed ({exc})") from None
    if not parts:
        raise ExrError("the file has no parts")
    for part in parts:
        kind = part.attrs.get("type", b"scanlineimage").rstrip(b"\0")
        if kind != b"scanlineimage":
            raise ExrError(f"part {part.name!r} is {kind.decode()}; save scanline images")
    return parts, pos, multipart


def _unpredict(data: bytes) -> bytes:
    """Undo OpenEXR's ZIP/RLE byte predictor and the split into even and odd bytes."""
    t = np.frombuffer(data, np.uint8).astype(np.int64)
    t[1:] -= 128
    t = (np.cumsum(t) & 0xFF).astype(np.uint8)
    out = np.empty_like(t)
    half = (len(t) + 1) // 2
    out[0::2], out[1::2] = t[:half], t[half:]
    return out.tobytes()


def _unrle(data: bytes, expected: int) -> bytes:
    """OpenEXR's run-length decoding: a negative count copies bytes, else repeats one."""
    out, pos = bytearray(), 0
    while pos < len(data) and len(out) < expected:
        count = struct.unpack_from("b", data, pos)[0]
        if count < 0:
            out += data[pos + 1 : pos + 1 - count]
            pos += 1 - count
        else:
            out += data[pos + 1 : pos + 2] * (count + 1)
            pos += 2
    return bytes(out)


def _decode(data: bytes, codec: int, expected: int) -> bytes:
    """One chunk's pixel bytes; a chunk stored no smaller than raw is raw (OpenEXR's rule)."""
    if codec == 0 or len(data) >= expected:
        raw = data
    elif codec == 1:
        raw = _unpredict(_unrle(data, expected))
    else:
        try:
            inflate = zlib.decompressobj()
            raw = _unpredict(inflate.decompress(data, expected))
        except zlib.error as exc:
            raise ExrError(f"a ZIP chunk does not decompress ({exc})") from None
    if len(raw) != expected:
        raise ExrError(f"a chunk holds {len(raw)} bytes of pixels, {expected} expected")
    return raw


def _check_codec(part: Part) -> None:
    """ExrError for a codec this reader does not decode, saying what to save instead."""
    if part.compression not in _LINES:
        codec = _CODECS.get(part.compression, f"codec {part.compression}")
        raise ExrError(
            f"compressed with {codec}, which this reader does not decode; save the EXR "
            "with codec ZIP (Blender's default), ZIPS, RLE or None"
        )


def read_channels(path: str | Path, names: Sequence[str], max_pixels: int) -> dict[str, np.ndarray]:
    """The named channels of an OpenEXR file as (H, W) float32 arrays, rows top to bottom.

    Every name must be in one part; ExrError (naming nothing but the problem: callers add
    the file) when a part is over ``max_pixels``, or the file is malformed or unsupported.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(MAX_HEADER_BYTES)
        parts, pos, multipart = read_header(head)
        index = next((i for i, p in enumerate(parts) if set(names) <= set(p.channels)), None)
        if index is None:
            raise ExrError(f"no part holds the channels {', '.join(names)}")
        part = parts[index]
        if part.width < 1 or part.height < 1 or part.width * part.height > max_pixels:
            raise ExrError(
                f"the image is {part.width}x{part.height} pixels; the limit is {max_pixels} "
                "pixels (8192x8192)"
            )
        _check_codec(part)
        handle.seek(pos + 8 * sum(p.chunks for p in parts[:index]))
        table = handle.read(8 * part.chunks)
        if len(table) != 8 * part.chunks:
            raise ExrError("the chunk offset table is truncated")
        offsets = struct.unpack(f"<{part.chunks}Q", table)
        return _read_part(handle, part, index if multipart else None, offsets, names)


def _read_part(handle, part: Part, index: int | None, offsets, names) -> dict[str, np.ndarray]:
    """Decode the chunks of ``part`` at ``offsets`` into the channels ``names``."""
    channels = sorted(part.channels.items())  # OpenEXR stores channels in name order
    row_bytes = sum(part.width * _TYPES[k].itemsize for _, k in channels)
    lines = _LINES[part.compression]
    out = {n: np.zeros((part.height, part.width), np.float32) for n in names}
    filled = np.zeros(part.height, bool)
    prefix = 12 if index is not None else 8
    for offset in offsets:
        handle.seek(offset)
        head = handle.read(prefix)
        if len(head) != prefix:
            raise ExrError("a chunk offset points past the end of the file")
        if index is not None and struct.unpack_from("<i", head)[0] != index:
            raise ExrError("a chunk belongs to another part than its offset table says")
        y, size = struct.unpack_from("<ii", head, prefix - 8)
        first = y - part.y0
        count = min(lines, part.height - first)
        if first < 0 or first % lines or count < 1 or not 0 <= size <= row_bytes * count:
            raise ExrError(f"a chunk claims rows from {y} and {size} bytes, beyond the image")
        data = handle.read(size)
        if len(data) != size:
            raise ExrError("a chunk is truncated")
        raw = _decode(data, part.compression, row_bytes * count)
        _scatter(raw, channels, part.width, first, count, out)
        filled[first : first + count] = True
    if not filled.all():
        raise ExrError(f"rows {np.flatnonzero(~filled)[:3].tolist()}.. are missing")
    return out


def _scatter(raw: bytes, channels, width: int, first: int, count: int, out) -> None:
    """Copy the rows of one decoded chunk (row by row, channels in name order) into ``out``."""
    pos = 0
    for row in range(first, first + count):
        for name, kind in channels:
            dtype = _TYPES[kind]
            if name in out:
                out[name][row] = np.frombuffer(raw, dtype, width, pos)
            pos += width * dtype.itemsize


def channel_names(path: str | Path) -> list[list[str]]:
    """The channel names of each part of an OpenEXR file (header only)."""
    with open(path, "rb") as handle:
        parts, _, _ = read_header(handle.read(MAX_HEADER_BYTES))
    return [sorted(p.channels) for p in parts]
