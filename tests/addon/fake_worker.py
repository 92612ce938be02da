"""A stand-in for ``python -m backend serve`` speaking the same protocol (stdlib only).

generate: accepted, a stray non-protocol line, progress, then done (an empty frame list).
A job's prompt picks another script:

- "crash": write to stderr and exit with status 3;
- "hang": accepted, then nothing: cancels are ignored (a worker stuck in a model call);
- "stale": messages of an earlier job id first, then the job waits for its cancel;
- "late": accepted; a cancel is answered with done (the job finished before the cancel
  arrived), after writing a frame into the job's output folder.

preview_detector: a download message, then ``detected`` with a 2x2 grey PNG written to
the system's temporary folder and the request echoed (``request``); detector "mlsd"
without allow_pickle is answered with an error instead, as the backend does.
"""

import json
import os
import struct
import sys
import tempfile
import zlib


def write_png(path: str) -> None:
    """A 2x2 grey 8-bit RGB PNG (stdlib only)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + b"\x80" * 6 for _ in range(2))
    header = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header))
        f.write(chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def send(kind: str, /, **payload: object) -> None:
    sys.stdout.write(json.dumps({"type": kind, **payload}) + "\n")
    sys.stdout.flush()


send("ready", version="fake", pid=os.getpid())
scripts: dict[str, dict] = {}  # job id -> job, for jobs that wait for their cancel
for line in sys.stdin:
    message = json.loads(line)
    if message["type"] == "shutdown":
        break
    if message["type"] == "cancel" and message["id"] in scripts:
        job = scripts.pop(message["id"])
        if job["prompt"] == "late":
            os.makedirs(job["out"])
            frame = os.path.join(job["out"], "frame_00001.png")
            with open(frame, "wb") as f:
                f.write(b"not really a png")
            send("done", id=message["id"], out=job["out"], frames=[frame])
        elif job["prompt"] == "stale":
            send("cancelled", id=message["id"])
        continue
    if message["type"] == "preview_detector":
        request_id = message["id"]
        if message.get("detector") == "mlsd" and not message.get("allow_pickle"):
            send("error", id=request_id, kind="DetectorUnavailableError",
                 message="detector 'mlsd' comes only from controlnet-aux (pickled)", traceback="")  # fmt: skip
            continue
        send("download", id=request_id, model="tiny/depth", file="model.safetensors",
             bytes_done=5, bytes_total=10, rate=0.0, files_done=0, files_total=1)  # fmt: skip
        path = os.path.join(tempfile.gettempdir(), f"t2vz-fake-detected-{request_id}.png")
        write_png(path)
        send("detected", id=request_id, detector=message.get("detector"),
             frame=message.get("frame"), path=path, request=message)  # fmt: skip
        continue
    if message["type"] == "generate":
        job_id = message["id"]
        prompt = message["job"].get("prompt")
        if prompt in ("hang", "stale", "late"):
            send("accepted", id=job_id)
            if prompt == "stale":
                send("progress", id="earlier", step=9, total=9, fraction=0.9, stage="denoising")
                send("preview", id="earlier", frame=0, path=message["job"]["out"])
                send("done", id="earlier", out=message["job"]["out"], frames=["/x.png"])
                send("error", id="earlier", kind="Boom", message="an old failure")
            if prompt != "hang":
                scripts[job_id] = message["job"]
            continue
        if prompt == "crash":
            sys.stderr.write("fatal: the fake worker crashed\n")
            sys.stderr.flush()
            sys.exit(3)
        send("accepted", id=job_id)
        sys.stdout.write("some library printed this\n")
        send(
            "progress",
            id=job_id,
            step=1,
            total=1,
            frames_done=0,
            frames_total=1,
            fraction=0.5,
            stage="denoising",
        )
        # Echoes the request's allow_pickle so tests see what the client sent beside the job.
        allowed = message.get("allow_pickle", False)
        send("done", id=job_id, out=message["job"]["out"], frames=[], allow_pickle=allowed)
