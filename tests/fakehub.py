"""A Hugging Face Hub stand-in on the loopback address, for the real huggingface_hub client.

Serves model repos built in a test (``{repo_id: {path: bytes}}``) through the endpoints
``hf_hub_download`` and ``HfApi.model_info`` use: the revision API
(``/api/models/{repo}/revision/{rev}``, with file sizes for ``blobs=true``) and resolve
URLs (``/{repo}/resolve/{rev}/{path}``) answering HEAD with the commit, ETag and size
headers and GET with the bytes (Range supported). ``rate`` throttles the bytes a second so
that progress can be watched and a download cancelled midway. Set ``HF_ENDPOINT`` to
``url`` (and ``HF_HUB_OFFLINE=0``) in the process that downloads, or call
``use_in_process`` to download in the test's own process. The server is stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 16 * 1024


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 serving ``repos``; use as a context manager."""

    def __init__(self, repos: dict[str, dict[str, bytes]], rate: float | None = None):
        self.repos = repos
        self.rate = rate  # bytes per second of each GET body, None: as fast as possible
        # (method, path, Range header or None) in arrival order
        self.requests: list[tuple[str, str, str | None]] = []
        self.bytes_sent = 0
        self.broken: set[str] = set()  # files whose resolve URL answers 500 (a failing CDN)
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                hub.handle(self, body=False)

            def do_GET(self) -> None:
                hub.handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def files_sent(self) -> list[str]:
        """The files this Hub sent (GET of resolve URLs) in order, as repo:file."""
        return [
            path[1:].replace("/resolve/", ":", 1).replace(f"{COMMIT}/", "", 1)
            for method, path, _ in self.requests
            if method == "GET" and "/resolve/" in path
        ]

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ answers

    def handle(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        """Route one request."""
        path = urllib.parse.urlsplit(request.path)
        with self.lock:
            self.requests.append((request.command, path.path, request.headers.get("Range")))
        route = urllib.parse.unquote(path.path)
        api = re.fullmatch(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", route)
        if api and request.command == "GET":
            self.model_info(request, api["repo"], "blobs=true" in path.query)
            return
        resolve = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", route)
        if resolve:
            self.resolve(request, resolve["repo"], resolve["file"], body)
            return
        self.send(request, 404, b'{"error": "not found"}', {"X-Error-Code": "EntryNotFound"})

    def model_info(self, request: BaseHTTPRequestHandler, repo: str, blobs: bool) -> None:
        """The revision API: the commit and the files (with sizes when blobs=true)."""
        files = self.repos.get(repo)
        if files is None:
            self.send(
                request, 404, b'{"error": "Repository not found"}',
                {"X-Error-Code": "RepoNotFound"},
            )  # fmt: skip
            return
        siblings = []
        for name, data in sorted(files.items()):
            entry: dict[str, Any] = {"rfilename": name}
            if blobs:
                entry.update(size=len(data), blobId=hashlib.sha1(data).hexdigest())
            siblings.append(entry)
        info = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": siblings}
        self.send(request, 200, json.dumps(info).encode(), {"Content-Type": "application/json"})

    def resolve(self, request: BaseHTTPRequestHandler, repo: str, name: str, body: bool) -> None:
        """A file: HEAD gives its metadata, GET its bytes (from a Range start if asked)."""
        data = self.repos.get(repo, {}).get(name)
        if name in self.broken:
            self.send(request, 500, b"", {})
            return
        if data is None:
            self.send(request, 404, b"", {"X-Error-Code": "EntryNotFound"})
            return
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Accept-Ranges": "bytes",
        }
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range") or "")
        if match and body:
            start = int(match[1])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        status = 206 if start else 200
        if not body:
            headers["Content-Length"] = str(len(data))
            self.send(request, status, None, headers)
            return
        self.send(request, status, data[start:], headers)

    def send(
        self,
        request: BaseHTTPRequestHandler,
        status: int,
        data: bytes | None,
        headers: dict[str, str],
    ) -> None:
        """Reply, throttled to ``rate`` bytes a second when set."""
        request.send_response(status)
        for key, value in headers.items():
            request.send_header(key, value)
        if data is not None:
            request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if not data:
            return
        started = time.monotonic()
        try:
            for offset in range(0, len(data), CHUNK):
                request.wfile.write(data[offset : offset + CHUNK])
                with self.lock:
                    self.bytes_sent += min(CHUNK, len(data) - offset)
                if self.rate:
                    ahead = (offset + CHUNK) / self.rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a cancelled download)


def use_in_process(hub: FakeHub, setattr: Any, cache: Any) -> None:
    """Point this process's huggingface_hub at ``hub``, online, with the hub cache ``cache``.

    ``setattr`` is a monkeypatch's (undone after the test). huggingface_hub reads
    ``HF_ENDPOINT`` once, at import, into ``ENDPOINT`` and the resolve URL template: both
    are set here. Imports huggingface_hub (only this helper does).
    """
    from huggingface_hub import constants

    setattr(constants, "HF_HUB_OFFLINE", False)
    setattr(constants, "ENDPOINT", hub.url)
    setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        hub.url + "/{repo_id}/resolve/{revision}/{filename}",
    )
    setattr(constants, "HF_HUB_CACHE", str(cache))
