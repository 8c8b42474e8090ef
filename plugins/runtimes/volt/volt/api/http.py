"""Just enough HTTP/1.1 for Firecracker's API clients (curl, Python and Go SDKs).

Requests are parsed from a byte buffer as it fills (:func:`parse`), so the server
never blocks on a slow or vanishing client. Bodies need a Content-Length and are
bounded (:data:`MAX_BODY`, Firecracker's default API payload limit), as is the
header block; keep-alive is the default, ``Connection: close`` is honoured, and
``Expect: 100-continue`` is answered. Anything else malformed is an
:class:`HttpError`, answered with 400 and a ``fault_message`` before the
connection closes (the stream cannot be trusted to stay in step after that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: Firecracker's default --http-api-max-payload-size.
MAX_BODY = 51200
MAX_HEAD = 8192
METHODS = ("GET", "PUT", "PATCH", "DELETE", "POST", "HEAD", "OPTIONS")
REASONS = {100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request",
           503: "Service Unavailable"}
SERVER = "Volt API"


class HttpError(Exception):
    """A request that cannot be parsed; the connection is answered 400 and closed."""


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def keep_alive(self) -> bool:
        return self.headers.get("connection", "").lower() != "close"


@dataclass
class Response:
    status: int
    body: Any = None          # a JSON-able value, or None for no body

    def encode(self, *, close: bool = False) -> bytes:
        head = [f"HTTP/1.1 {self.status} {REASONS.get(self.status, '')}".rstrip(),
                f"Server: {SERVER}", f"Connection: {'close' if close else 'keep-alive'}"]
        payload = b""
        if self.body is not None:
            payload = json.dumps(self.body).encode()
            head.append("Content-Type: application/json")
        if self.status != 204:
            head.append(f"Content-Length: {len(payload)}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


def fault(message: str) -> Response:
    """A 400 with Firecracker's error body."""
    return Response(400, {"fault_message": message})


@dataclass
class Parsed:
    """What :func:`parse` found at the front of a buffer."""

    request: Request | None       # None: more bytes are needed
    used: int = 0                 # bytes of the buffer the request took
    expects_continue: bool = False


def parse(buf: bytes | bytearray) -> Parsed:
    """The first complete request in ``buf``, or ``Parsed(None)`` if it is not all there.

    Raises :class:`HttpError` for anything malformed or over the limits.
    """
    end, sep = _head_end(buf)
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise HttpError(f"request head larger than {MAX_HEAD} bytes")
        return Parsed(None)
    if end > MAX_HEAD:
        raise HttpError(f"request head larger than {MAX_HEAD} bytes")
    try:
        text = bytes(buf[:end]).decode("ascii")
    except UnicodeDecodeError:
        raise HttpError("request head is not ASCII") from None
    lines = text.replace("\r\n", "\n").split("\n")
    method, path = _request_line(lines[0])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or any(c in name for c in " \t"):
            raise HttpError(f"malformed header line {line[:60]!r}")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise HttpError("Transfer-Encoding is not supported; send a Content-Length")
    length = _content_length(headers.get("content-length", "0"))
    start = end + sep
    if len(buf) - start < length:
        expect = headers.get("expect", "").lower() == "100-continue"
        return Parsed(None, expects_continue=expect)
    return Parsed(Request(method, path, headers, bytes(buf[start:start + length])),
                  start + length)


def _head_end(buf: bytes | bytearray) -> tuple[int, int]:
    """(index where the head ends, length of the blank line), or (-1, 0)."""
    crlf, lf = buf.find(b"\r\n\r\n"), buf.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, 4
    return (lf, 2) if lf >= 0 else (-1, 0)


def _request_line(line: str) -> tuple[str, str]:
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(f"malformed request line {line[:80]!r}")
    method, target, _version = parts
    if method not in METHODS:
        raise HttpError(f"unsupported HTTP method {method[:20]!r}")
    if target.startswith(("http://", "https://")):          # absolute form
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    if not target.startswith("/"):
        raise HttpError(f"malformed request target {target[:80]!r}")
    return method, target.partition("?")[0]


def _content_length(value: str) -> int:
    if not value.isdigit() or len(value) > 12:
        raise HttpError(f"invalid Content-Length {value[:20]!r}")
    n = int(value)
    if n > MAX_BODY:
        raise HttpError(f"Request payload with size {n} is larger than the limit of "
                        f"{MAX_BODY} allowed by server.")
    return n


def continue_response() -> bytes:
    return b"HTTP/1.1 100 Continue\r\n\r\n"
