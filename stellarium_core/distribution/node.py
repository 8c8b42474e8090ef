"""A node's HTTP server: its chunks by hash for peer nodes, and its images in the CDN
layout, so ``stellar pull http://NODE/tags/NAME`` works against any node.

- ``GET /chunks/<hex>`` and ``GET /blobs/<hex>``: a chunk this node holds (its hot
  tier or its store; never fetched from elsewhere on a peer's behalf, so a ring
  of nodes cannot send requests in circles), raw bytes, 404 if it has none;
- ``GET /manifests/<hex>.json``: an image or layer manifest, byte for byte;
- ``GET /tags/<name>``: the digest of the image bound to ``name``;
- ``GET /stats``: what this server sent so far (JSON), for operators and tests.

Every response is named by its digest (tags excepted), and the receiver verifies
it; the server only reads. Nothing in a URL reaches the filesystem but a
validated digest or image name.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from stellarium_core.distribution.images import ImageStore, check_name
from stellarium_core.errors import StellarError

_ROUTE = re.compile(r"^/(?:(?P<kind>chunks|blobs)/(?P<chunk>[0-9a-f]{64})"
                    r"|manifests/(?P<manifest>[0-9a-f]{64})\.json"
                    r"|tags/(?P<tag>[^/]+)|(?P<stats>stats))$")


class NodeServer(ThreadingHTTPServer):
    """Serves one host's store; ``counters`` say how many requests and bytes it answered."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], router: Any, images: ImageStore) -> None:
        super().__init__(address, _Handler)
        self.router, self.images = router, images
        self.counters = {"requests": 0, "bytes_sent": 0, "chunks_sent": 0, "not_found": 0}
        self._mu = threading.Lock()

    def count(self, **add: int) -> None:
        with self._mu:
            for k, n in add.items():
                self.counters[k] += n

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: NodeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Quiet: a node answers many small requests."""

    def _send(self, status: int, body: bytes | memoryview, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            self.server.count(bytes_sent=len(body))

    def _missing(self, why: str) -> None:
        self.server.count(not_found=1)
        self._send(404, (why + "\n").encode(), "text/plain")

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.count(requests=1)
        m = _ROUTE.match(self.path)
        if m is None:
            return self._missing("not found")
        try:
            if m["chunk"]:
                body = self.server.router.view(bytes.fromhex(m["chunk"]), local=True)
                self.server.count(chunks_sent=1)
                return self._send(200, body, "application/octet-stream")
            if m["manifest"]:
                data = self.server.images.intact(bytes.fromhex(m["manifest"]))
                if data is None:
                    return self._missing("no such manifest")
                return self._send(200, data, "application/json")
            if m["tag"]:
                digest = self.server.images.resolve(check_name(unquote(m["tag"])))
                return self._send(200, (digest.hex() + "\n").encode(), "text/plain")
            body = json.dumps(self.server.counters).encode()
            return self._send(200, body, "application/json")
        except StellarError as exc:  # no (good) copy here, no such image: ask elsewhere
            return self._missing(str(exc))


def serve(router: Any, images: ImageStore, host: str, port: int) -> NodeServer:
    """A started server (its own threads) on ``host:port``; ``shutdown()`` stops it."""
    server = NodeServer((host, port), router, images)
    threading.Thread(target=server.serve_forever, name="node-server", daemon=True).start()
    return server
