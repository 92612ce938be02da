"""OpenEXR motion-vector frames as a flow source (backend/media/exr.py, media/flow.py).

The frames are written by OpenCV's own OpenEXR writer (another implementation than the
reader under test), in a subprocess: its codec is off unless OPENCV_IO_ENABLE_OPENEXR is set
before its first use in a process. Blender's multilayer files are checked against the
rendered Vector pass in tests/addon/scene_control/test_vector_pass.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from backend.media.flow import FileFlows, FlowError, read_exr_vectors

H, W = 40, 70  # 40 rows: ZIP's 16-row chunks end with a short one
STEP = (3.0, -2.0)  # the square's motion a frame on screen, x right, y down

WRITER = """
import json, os, sys
os.environ["OPENCV_IO_ENABLE_OPENEXR"] = "1"
import cv2, numpy as np
for src, dst, params in json.loads(sys.argv[1]):
    if not cv2.imwrite(dst, np.load(src), params):
        sys.exit(f"cv2 could not write {dst}")
"""
CODECS = {"none": 0, "rle": 1, "zips": 2, "zip": 3, "piz": 4}


def write_exrs(items: list[tuple[Path, np.ndarray, str, str]]) -> None:
    """Write each (path, array in OpenCV's B, G, R[, A] order, codec, "float"|"half")."""
    jobs = []
    for path, array, codec, kind in items:
        source = path.with_suffix(".src.npy")
        np.save(source, array.astype(np.float32))
        params = [cv2.IMWRITE_EXR_COMPRESSION, CODECS[codec]]
        params += [cv2.IMWRITE_EXR_TYPE, 2 if kind == "float" else 1]
        jobs.append((str(source), str(path), params))
    env = {**os.environ, "OPENCV_IO_ENABLE_OPENEXR": "1"}
    subprocess.run([sys.executable, "-c", WRITER, json.dumps(jobs)], check=True, env=env)
    for source, _, _ in jobs:
        os.unlink(source)


def blender_vectors(frame: int) -> np.ndarray:
    """(H, W, 4) Vector pass (X, Y, Z, W; y up) of a square moving by STEP over a slow pan."""
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    dx, dy = np.full((H, W), 0.25 + xs / W, np.float32), ys / (4 * H)  # the pan, smooth
    square = (abs(xs - 20 - STEP[0] * frame) < 8) & (abs(ys - 20 - STEP[1] * frame) < 8)
    dx[square], dy[square] = STEP
    # to the previous frame: -(dx, dy), y flipped; Z/W: current minus next, y flipped
    return np.stack([-dx, dy, -dx, dy], axis=-1)


def npy_layout(blender: np.ndarray) -> np.ndarray:
    """The .npy convention of backend/media/flow.py: (X, -Y, -Z, W)."""
    return (blender * np.array([1, -1, -1, 1], np.float32)).astype(np.float32)


def bgra(blender: np.ndarray) -> np.ndarray:
    """X, Y, Z, W as R, G, B, A in OpenCV's channel order (B, G, R, A)."""
    return blender[..., [2, 1, 0, 3]]


@pytest.mark.parametrize(
    ("codec", "kind"),
    [("none", "float"), ("rle", "float"), ("zips", "float"), ("zip", "float"), ("zip", "half")],
)
def test_exr_frames_read_back_as_the_npy_frames(tmp_path: Path, codec: str, kind: str) -> None:
    exr, npy = tmp_path / "exr", tmp_path / "npy"
    exr.mkdir(), npy.mkdir()
    write_exrs([(exr / f"{k:04d}.exr", bgra(blender_vectors(k)), codec, kind) for k in range(3)])
    for k in range(3):
        np.save(npy / f"frame_{k + 1:05d}.npy", npy_layout(blender_vectors(k)))
    for k in range(3):
        got, want = read_exr_vectors(exr / f"{k:04d}.exr"), npy_layout(blender_vectors(k))
        assert got.shape == (H, W, 4) and got.dtype == np.float32
        # float frames come back bit for bit; half frames to float16's 11 bits
        np.testing.assert_allclose(got, want, rtol=0 if kind == "float" else 1e-3, atol=0)
    from_exr = FileFlows(exr, range(3), (5, 10), (H, W))
    from_npy = FileFlows(npy, range(3), (5, 10), (H, W))
    for k in (1, 2):
        torch.testing.assert_close(from_exr[k], from_npy[k], rtol=1e-3, atol=1e-4)
    # the square's pixels came from STEP back: (-3, 2) px, at the latent grid (7 px a column, 8 a row)
    square = from_exr[1][:2, 2, 3]  # latent pixel (2, 3): pixels (16..23, 21..27), all square
    torch.testing.assert_close(square, -torch.tensor(STEP) * torch.tensor([10 / W, 5 / H]))


def test_exr_frames_refuse_what_the_reader_cannot_decode(tmp_path: Path) -> None:
    frame = bgra(blender_vectors(0))
    write_exrs(
        [
            (tmp_path / "piz.exr", frame, "piz", "float"),
            (tmp_path / "rgb.exr", frame[..., :3], "zip", "float"),
            (tmp_path / "zip.exr", frame, "zip", "float"),
        ]
    )
    with pytest.raises(FlowError, match=r"piz\.exr: compressed with PIZ.*codec ZIP"):
        read_exr_vectors(tmp_path / "piz.exr")
    with pytest.raises(FlowError, match=r"rgb\.exr: it holds no Vector pass \(channels: B, G, R\)"):
        read_exr_vectors(tmp_path / "rgb.exr")
    data = (tmp_path / "zip.exr").read_bytes()
    (tmp_path / "short.exr").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(FlowError, match=r"short\.exr: .*(truncated|past the end)"):
        read_exr_vectors(tmp_path / "short.exr")
    (tmp_path / "text.exr").write_text("not pixels")
    with pytest.raises(FlowError, match=r"text\.exr: not an OpenEXR file"):
        read_exr_vectors(tmp_path / "text.exr")
    window = data.index(b"dataWindow\0box2i\0") + len(b"dataWindow\0box2i\0") + 4
    huge = data[: window + 8] + np.array([8999, 8999], "<i4").tobytes() + data[window + 16 :]
    (tmp_path / "huge.exr").write_bytes(huge)
    with pytest.raises(FlowError, match=r"huge\.exr: the image is 9000x9000 pixels; the limit"):
        read_exr_vectors(tmp_path / "huge.exr")


def test_exr_folders_hold_one_kind_and_enough_frames(tmp_path: Path) -> None:
    write_exrs([(tmp_path / "0001.exr", bgra(blender_vectors(0)), "zip", "float")])
    with pytest.raises(FlowError, match=r"holds 1 \.exr frames, the job needs 2"):
        FileFlows(tmp_path, range(2), (5, 10), (H, W))
    np.save(tmp_path / "0002.npy", npy_layout(blender_vectors(1)))
    with pytest.raises(FlowError, match=r"holds both \.npy and \.exr frames"):
        FileFlows(tmp_path, range(2), (5, 10), (H, W))
