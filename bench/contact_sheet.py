"""A contact sheet of a result folder: its frames side by side in one PNG.

.venv/bin/python -m bench.contact_sheet t2vz_out/demo-shapes-20261122-060000 docs/demo.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np


def frames_strip(folder: Path, every: int = 1, gap: int = 2) -> np.ndarray:
    """(H, frames * (W + gap) - gap, 3) BGR strip of ``frame_*.png`` in order."""
    paths = sorted(folder.glob("frame_*.png"))[::every]
    if not paths:
        raise ValueError(f"{folder} has no frame_*.png")
    images = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths]
    h, w = images[0].shape[:2]
    strip = np.full((h, len(images) * (w + gap) - gap, 3), 255, np.uint8)
    for i, image in enumerate(images):
        strip[:, i * (w + gap) : i * (w + gap) + w] = image
    return strip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.contact_sheet", description=__doc__)
    parser.add_argument("folder", type=Path, help="a result folder with frame_*.png")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--every", type=int, default=1, help="take every n-th frame")
    parser.add_argument("--scale", type=int, default=1, help="enlarge (nearest) by this factor")
    args = parser.parse_args(argv)
    strip = frames_strip(args.folder, args.every)
    if args.scale > 1:
        strip = cv2.resize(
            strip, None, fx=args.scale, fy=args.scale, interpolation=cv2.INTER_NEAREST
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), strip, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"{args.out}: {strip.shape[1]}x{strip.shape[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
