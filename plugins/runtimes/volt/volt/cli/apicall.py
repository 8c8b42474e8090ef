"""The ``volt`` commands that drive a running VM do it through its API socket, as any
Firecracker client would: one request at a time, over HTTP/1.1 on the unix socket."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from stellarium_core.errors import StellarError


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=900)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def call(sock: str, method: str, path: str, body: dict[str, Any]) -> Any:
    """One API request; its JSON answer (None for 204). A refusal is a StellarError
    with the VMM's fault message."""
    conn = _UnixConnection(sock)
    try:
        conn.request(method, path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    except OSError as exc:
        raise StellarError(f"{sock}: {exc.strerror or exc}") from None
    finally:
        conn.close()
    if resp.status >= 300:
        try:
            reason = json.loads(data)["fault_message"]
        except (ValueError, KeyError, TypeError):
            reason = data.decode(errors="replace")[:500]
        raise StellarError(f"{method} {path}: {resp.status}: {reason}")
    return json.loads(data) if data else None
