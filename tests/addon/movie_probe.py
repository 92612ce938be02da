"""Run by the movie-frame tests in a separate process (PyAV and OpenCV stay out of Blender's).

python movie_probe.py late-mkv PATH       a 12-frame 30 fps H.264 .mkv whose frames after
                                          the first carry timestamps 1 ms late
python movie_probe.py read SPECS.json     the grey level of each frame the backend reads
                                          for each {"spec": VideoInput dict, "frames": n}
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

FRAMES = 12
SIZE = 32


def grey(k: int) -> int:
    """The grey level of movie frame k: 20, 40, ... 240 (far apart after H.264)."""
    return 20 + 20 * k


def write_late_mkv(path: str) -> None:
    """Like a screen or phone recording: millisecond timestamps, all but the first late."""
    from fractions import Fraction

    import av
    import numpy as np

    time_base = Fraction(1, 1000)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = time_base
        for k in range(FRAMES):
            image = np.full((SIZE, SIZE, 3), grey(k), np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = round(k * 1000 / 30) + (1 if k else 0)
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read(specs_file: str) -> None:
    """Print, per spec, the grey level at the centre of each frame the backend reads."""
    from backend.media.video_io import read_frames
    from backend.protocol import validate_job

    out = []
    for item in json.loads(Path(specs_file).read_text()):
        job = validate_job(
            {"prompt": "p", "out": "/tmp/o", "mode": "pix2pix", "video": item["spec"]}
        )
        frames = read_frames(job.video, range(item["frames"]), SIZE, SIZE)
        out.append([int(frames[f][SIZE // 2, SIZE // 2].mean()) for f in sorted(frames)])
    print(json.dumps(out))


if __name__ == "__main__":
    command, argument = sys.argv[1], sys.argv[2]
    {"late-mkv": write_late_mkv, "read": read}[command](argument)
    sys.stdout.flush()
