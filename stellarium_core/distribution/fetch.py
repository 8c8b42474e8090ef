"""HTTP(S) GETs of CDN objects: verified, retried with backoff, bounded in time.

Every object in the CDN layout is named by the hash of its bytes, so a GET is
only accepted when the body hashes to the name asked for. Failures that can
heal (connection reset, timeout, 5xx, short body, wrong bytes) are retried with
exponential backoff; a 4xx is final. Each worker thread keeps one keep-alive
connection, because a pull is thousands of small GETs to one origin. Bodies may
arrive gzip-encoded (a server with precompressed ``.gz`` siblings, e.g. nginx
``gzip_static``); the hash is always checked on the decoded bytes.
"""

from __future__ import annotations

import http.client
import math
import socket
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from stellarium_core.errors import StellarError, UsageError


class FetchError(StellarError):
    """A GET failed for good (after retries); the message names the URL and why."""


class _Retryable(Exception):
    """One attempt failed in a way a later attempt may not."""


@dataclass(frozen=True)
class FetchPolicy:
    """How hard to try: the time one GET may take in all, attempts, backoff base and cap."""

    timeout: float = 30.0
    attempts: int = 4
    backoff: float = 0.5
    backoff_max: float = 8.0

    def __post_init__(self) -> None:
        for name, value, low, high in (("timeout", self.timeout, 0, MAX_TIMEOUT),
                                       ("backoff", self.backoff, 0, MAX_TIMEOUT),
                                       ("backoff_max", self.backoff_max, 0, MAX_TIMEOUT)):
            if not (isinstance(value, int | float) and math.isfinite(value)
                    and low <= value <= high) or (name == "timeout" and value == 0):
                raise UsageError(f"{name} must be a number of seconds in (0, {high}], "
                                 f"got {value!r}")
        if not (isinstance(self.attempts, int) and 1 <= self.attempts <= MAX_ATTEMPTS):
            raise UsageError(f"attempts must be 1..{MAX_ATTEMPTS}, got {self.attempts!r}")


#: Bounds that keep a pull finite whatever the flags say: a day per GET, 100 tries.
MAX_TIMEOUT = 86400.0
MAX_ATTEMPTS = 100


class _Deadlines:
    """Shuts down the socket of a GET that outlives its deadline.

    A socket timeout bounds each read, not a transfer: a server that trickles
    a byte just inside it keeps every read alive forever (headers included,
    which http.client reads line by line). One thread per Fetcher watches the
    deadlines of the GETs in flight and shuts their sockets down when due.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._due: dict[int, tuple[float, socket.socket]] = {}
        self._fired: set[int] = set()
        self._next = 0
        self._thread: threading.Thread | None = None

    def arm(self, sock: socket.socket, seconds: float) -> int:
        with self._cv:
            self._next += 1
            self._due[self._next] = (time.monotonic() + seconds, sock)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-deadlines",
                                                daemon=True)
                self._thread.start()
            self._cv.notify()
            return self._next

    def disarm(self, token: int) -> bool:
        """Stop watching; whether the deadline had already passed (socket shut)."""
        with self._cv:
            self._due.pop(token, None)
            if token in self._fired:
                self._fired.discard(token)
                return True
            return False

    def _run(self) -> None:
        with self._cv:
            while True:
                now = time.monotonic()
                for token, (when, sock) in list(self._due.items()):
                    if when <= now:
                        del self._due[token]
                        self._fired.add(token)
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                soonest = min((when for when, _ in self._due.values()), default=None)
                self._cv.wait(None if soonest is None else max(0.0, soonest - now))


def _gunzip(data: bytes, limit: int, url: str) -> bytes:
    """Decode a gzip body, refusing more than ``limit`` bytes (no gzip bombs)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as exc:
        raise _Retryable(f"GET {url}: corrupt gzip body: {exc}") from None
    if len(out) > limit:
        raise FetchError(f"GET {url}: gzip body inflates past the {limit}-byte limit")
    if not d.eof:
        raise _Retryable(f"GET {url}: truncated gzip body")
    return out


def split_url(url: str) -> urllib.parse.SplitResult:
    """The parts of an http(s) URL; a malformed one (a bad IPv6 host, a port outside
    0..65535 or not a number) is a UsageError, not a ValueError."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - parsed lazily; raises here on a bad port
    except ValueError as exc:
        raise UsageError(f"bad URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"not an http(s) URL: {url!r}")
    return parts


class Fetcher:
    """GETs paths under one base URL; safe to share between threads."""

    def __init__(self, base_url: str, policy: FetchPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        parts = split_url(base_url)
        if not parts.hostname:
            raise UsageError(f"not an http(s) URL: {base_url!r}")
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self._parts = urllib.parse.urlsplit(self.base_url)
        self.policy = policy or FetchPolicy()
        self._sleep = sleep
        self._local = threading.local()
        self._lock = threading.Lock()
        self._deadlines = _Deadlines()
        self.bytes_received = 0
        self.requests = 0

    def url(self, path: str) -> str:
        return self.base_url + path

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = (http.client.HTTPSConnection if self._parts.scheme == "https"
                   else http.client.HTTPConnection)
            conn = cls(self._parts.hostname, self._parts.port, timeout=self.policy.timeout)
            self._local.conn = conn
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _attempt(self, path: str, limit: int) -> tuple[int, bytes]:
        """One GET, all of it within the policy's timeout: (bytes on the wire, body)."""
        url = self.url(path)
        start = time.monotonic()
        token = None
        try:
            conn = self._conn()
            if conn.sock is None:
                conn.connect()
            token = self._deadlines.arm(conn.sock, self.policy.timeout)
            return self._exchange(conn, path, limit)
        except TimeoutError:
            self._drop_conn()
            raise _Retryable(f"GET {url}: timed out after "
                             f"{time.monotonic() - start:.1f} s") from None
        except (OSError, http.client.HTTPException) as exc:
            self._drop_conn()
            raise _Retryable(f"GET {url}: {type(exc).__name__}: {exc}") from None
        finally:
            # Whatever the GET returned or raised once its socket was shut: a timeout.
            if token is not None and self._deadlines.disarm(token):
                self._drop_conn()
                raise _Retryable(f"GET {url}: timed out: it took longer than "
                                 f"{self.policy.timeout:g} s in all (a slow or stalled "
                                 "server)")

    def _exchange(self, conn: http.client.HTTPConnection, path: str,
                  limit: int) -> tuple[int, bytes]:
        url = self.url(path)
        target = self._parts.path + urllib.parse.quote(path)
        try:
            conn.request("GET", target, headers={"Accept-Encoding": "gzip"})
            resp = conn.getresponse()
            if resp.status != 200:
                resp.read()
                msg = f"GET {url}: HTTP {resp.status} {resp.reason}"
                if resp.status >= 500 or resp.status == 429:
                    raise _Retryable(msg)
                raise FetchError(msg)
            # http.client's parse of Content-Length: None when absent or not a number,
            # and then the body runs to the close (the hash check still applies).
            length = resp.length
            if length is not None and length > limit:
                self._drop_conn()
                raise FetchError(f"GET {url}: body of {length} bytes exceeds the "
                                 f"{limit}-byte limit")
            body = resp.read(limit + 1)
            if len(body) > limit:
                self._drop_conn()
                raise FetchError(f"GET {url}: body exceeds the {limit}-byte limit")
            if length is not None and len(body) != length:
                raise _Retryable(f"GET {url}: truncated body ({len(body)} of {length} bytes)")
            if resp.will_close:
                self._drop_conn()
            encoding = (resp.getheader("Content-Encoding") or "identity").lower()
            if encoding == "gzip":
                return len(body), _gunzip(body, limit, url)
            if encoding != "identity":
                raise FetchError(f"GET {url}: unsupported Content-Encoding {encoding!r}")
            return len(body), body
        except http.client.IncompleteRead as exc:
            self._drop_conn()
            raise _Retryable(f"GET {url}: truncated body ({len(exc.partial)} bytes, "
                             f"{exc.expected} more expected)") from None

    def get(self, path: str, verify: Callable[[bytes], str | None] | None = None, *,
            limit: int = 64 << 20) -> bytes:
        """GET ``path`` (at most ``limit`` bytes); ``verify(body)`` returns a complaint
        or None. Retries, then raises :class:`FetchError`."""
        delay = self.policy.backoff
        last = ""
        for attempt in range(1, self.policy.attempts + 1):
            try:
                wire, body = self._attempt(path, limit)
                with self._lock:
                    self.requests += 1
                    self.bytes_received += wire
                complaint = verify(body) if verify else None
                if complaint is None:
                    return body
                last = f"GET {self.url(path)}: {complaint}"
            except _Retryable as exc:
                self._drop_conn()  # its state is unknown after a failed exchange
                last = str(exc)
            if attempt < self.policy.attempts:
                self._sleep(delay)
                delay = min(delay * 2, self.policy.backoff_max)
        raise FetchError(f"{last} (gave up after {self.policy.attempts} attempts)")

    def close(self) -> None:
        """Close this thread's connection (worker threads' die with them)."""
        self._drop_conn()
