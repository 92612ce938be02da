"""A stand-in for ``python -m backend serve`` speaking the same protocol (stdlib only).

generate: accepted, a stray non-protocol line, progress, then done (an empty frame list).
A job whose prompt is "crash" makes the worker write to stderr and exit with status 3.
"""

import json
import os
import sys


def send(kind: str, **payload: object) -> None:
    sys.stdout.write(json.dumps({"type": kind, **payload}) + "\n")
    sys.stdout.flush()


send("ready", version="fake", pid=os.getpid())
for line in sys.stdin:
    message = json.loads(line)
    if message["type"] == "shutdown":
        break
    if message["type"] == "generate":
        job_id = message["id"]
        if message["job"].get("prompt") == "crash":
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
        send("done", id=job_id, out=message["job"]["out"], frames=[])
