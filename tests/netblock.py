"""Refuse network connections in the test process and in the subprocesses it starts.

``install()`` patches ``socket`` so that connecting anywhere but the local machine (loopback
addresses, Unix sockets) raises ``NetworkBlockedError``, and name lookups of anything but
local names fail the same way. ``sitecustomize_source()`` is this file as a
``sitecustomize`` module that installs the block when a subprocess starts. Stdlib only.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


class NetworkBlockedError(RuntimeError):
    """A test tried to reach the network."""


def is_local_host(host: Any) -> bool:
    """True for loopback addresses and local names (no network needed to reach them)."""
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).split("%", 1)[0].strip("[]").lower()
    if host in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_local_address(address: Any) -> bool:
    """True for a Unix socket path or a (host, port, ...) tuple with a local host."""
    if isinstance(address, (str, bytes)):
        return True  # AF_UNIX
    if isinstance(address, tuple) and address:
        return is_local_host(address[0])
    return False


def _refuse(what: str) -> NetworkBlockedError:
    return NetworkBlockedError(f"network access is blocked in tests: {what}")


def install(patch: Any = None) -> None:
    """Block the network; ``patch(obj, name, value)`` sets attributes (default: setattr)."""
    patch = patch or setattr
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_create_connection = socket.create_connection
    real_getaddrinfo = socket.getaddrinfo

    def connect(self, address):
        if not is_local_address(address):
            raise _refuse(f"connect to {address!r}")
        return real_connect(self, address)

    def connect_ex(self, address):
        if not is_local_address(address):
            raise _refuse(f"connect to {address!r}")
        return real_connect_ex(self, address)

    def create_connection(address, *args, **kwargs):
        if not is_local_address(address):
            raise _refuse(f"connection to {address!r}")
        return real_create_connection(address, *args, **kwargs)

    def getaddrinfo(host, *args, **kwargs):
        if not is_local_host(host) and host != socket.gethostname():
            raise _refuse(f"name lookup of {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    patch(socket.socket, "connect", connect)
    patch(socket.socket, "connect_ex", connect_ex)
    patch(socket, "create_connection", create_connection)
    patch(socket, "getaddrinfo", getaddrinfo)


def sitecustomize_source() -> str:
    """Source of a ``sitecustomize`` module that blocks the network in a new interpreter."""
    with open(__file__, encoding="utf-8") as handle:
        return handle.read() + "\n\ninstall()\n"
