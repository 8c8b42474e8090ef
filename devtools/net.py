"""Loopback ports for tests and benchmarks that start real servers."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (and nothing will answer)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` different free ports: each :func:`free_port` call alone may hand out the
    port a previous call did (a SeaweedFS master and volume server once got the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_listening(port: int, proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """Return once something accepts on ``port``; raise if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening")
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args[0]} did not listen on port {port} within {timeout:g} s")
