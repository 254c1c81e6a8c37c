"""The one free-port helper: process groups (``MASTER_PORT``), the embedded Ray cluster's ports,
the benchmarks' and tests' rank launchers all ask here."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (the OS picks it; it is free
    again when this returns, so bind it soon)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
