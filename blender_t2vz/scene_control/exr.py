"""A reader for the uncompressed multilayer OpenEXR files the passes are rendered to."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from .errors import SceneControlError

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
