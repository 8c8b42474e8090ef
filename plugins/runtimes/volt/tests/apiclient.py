"""A Firecracker API client for tests: the standard library's http.client over a unix socket,
and a ``volt run --api-sock`` process to talk to (also run inside the lab)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VOLT = str(Path(sys.executable).with_name("volt"))


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class Api:
    """One keep-alive connection; ``call`` returns (status, decoded JSON body or None)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn = UnixHTTPConnection(path)

    def call(self, method: str, url: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else (body if isinstance(body, bytes)
                                          else json.dumps(body).encode())
        self.conn.request(method, url, body=data,
                          headers={"Content-Type": "application/json"} if data else {})
        resp = self.conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None

    def close(self) -> None:
        self.conn.close()


def wait_for_socket(path: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"volt exited {proc.returncode} before serving the API")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"no API socket at {path} after {timeout:g}s")


class VoltProcess:
    """``volt [VOLT_ARGS] run --api-sock SOCK ARGS``, console to a file; stopped with
    SIGTERM at exit."""

    def __init__(self, sock: Path, *args: str, console: Path | None = None,
                 volt_args: list[str] | None = None, prefix: tuple[str, ...] = ()) -> None:
        """``prefix``: what runs volt (e.g. ``ip netns exec NS``)."""
        self.sock, self.console = str(sock), console
        out = open(console, "wb") if console else subprocess.DEVNULL   # noqa: SIM115
        self.proc = subprocess.Popen([*prefix, VOLT, *(volt_args or []), "run", "--api-sock",
                                      self.sock, *args],
                                     stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.PIPE)
        if console:
            out.close()
        wait_for_socket(self.sock, self.proc)
        self.api = Api(self.sock)

    def output(self) -> bytes:
        return self.console.read_bytes() if self.console else b""

    def wait_output(self, needle: bytes, timeout: float = 60.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if needle in self.output():
                return True
            if self.proc.poll() is not None:
                return needle in self.output()
            time.sleep(0.05)
        return False

    def stop(self) -> tuple[int, str]:
        """SIGTERM (if still running); returns (exit code, stderr)."""
        self.api.close()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err.decode(errors="replace")

    def threads(self) -> dict[str, dict[str, str]]:
        """Each thread's name and its NoNewPrivs / Seccomp_filters / CapEff."""
        out = {}
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                status = (task / "status").read_text()
                name = (task / "comm").read_text().strip()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            out[name] = {k: fields.get(k, "").strip()
                         for k in ("NoNewPrivs", "Seccomp_filters", "CapEff")}
        return out
