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
    """How hard to try: per-socket-operation timeout, attempts, backoff base and cap."""

    timeout: float = 30.0
    attempts: int = 4
    backoff: float = 0.5
    backoff_max: float = 8.0


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


class Fetcher:
    """GETs paths under one base URL; safe to share between threads."""

    def __init__(self, base_url: str, policy: FetchPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"not an http(s) URL: {base_url!r}")
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self._parts = urllib.parse.urlsplit(self.base_url)
        self.policy = policy or FetchPolicy()
        self._sleep = sleep
        self._local = threading.local()
        self._lock = threading.Lock()
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
        """One GET: (bytes on the wire, decoded body)."""
        url = self.url(path)
        target = self._parts.path + urllib.parse.quote(path)
        try:
            conn = self._conn()
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
        except TimeoutError:
            self._drop_conn()
            raise _Retryable(f"GET {url}: timed out (no data for "
                             f"{self.policy.timeout:g} s)") from None
        except (OSError, http.client.HTTPException) as exc:
            self._drop_conn()
            raise _Retryable(f"GET {url}: {type(exc).__name__}: {exc}") from None

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
