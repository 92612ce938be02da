"""The network block of conftest.py: tests and their subprocesses cannot reach the network."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
from netblock import NetworkBlockedError, is_local_address


@pytest.mark.parametrize(
    "address", [("192.0.2.1", 80), ("2001:db8::1", 443), ("huggingface.co", 443)]
)
def test_outside_connections_are_refused(address: tuple) -> None:
    with pytest.raises(NetworkBlockedError):
        socket.create_connection(address, timeout=1)
    with socket.socket() as sock:  # IPv4; the check runs before the address is used
        with pytest.raises(NetworkBlockedError):
            sock.connect(address)
        with pytest.raises(NetworkBlockedError):
            sock.connect_ex(address)


def test_name_lookups_and_http_are_refused() -> None:
    with pytest.raises(NetworkBlockedError):
        socket.getaddrinfo("huggingface.co", 443)
    with pytest.raises(NetworkBlockedError):
        urllib.request.urlopen("http://example.com/", timeout=1)


def test_loopback_still_works() -> None:
    """The block is selective: the worker protocol and local servers keep working."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"pong")

        thread = threading.Thread(target=answer)
        thread.start()
        with socket.create_connection(("localhost", port), timeout=5) as client:
            assert client.recv(4) == b"pong"
        thread.join(5)
    assert is_local_address("/tmp/some.sock")
    assert not is_local_address(("8.8.8.8", 53))


def test_hub_is_offline_in_process() -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE


def test_subprocesses_are_blocked_and_offline(backend_env: dict[str, str]) -> None:
    code = (
        "import os, socket\n"
        "assert os.environ['HF_HUB_OFFLINE'] == '1' and os.environ['TRANSFORMERS_OFFLINE'] == '1'\n"
        "socket.create_connection(('192.0.2.1', 80), timeout=1)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=backend_env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "NetworkBlockedError" in proc.stderr, proc.stderr
