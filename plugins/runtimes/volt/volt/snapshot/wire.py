"""The live-migration wire: typed, length-prefixed frames over one stream socket.

A frame is a type byte, a little-endian u32 payload length and the payload. Each
type has a size limit, checked before its payload is read, so a hostile or broken
peer costs at most that much memory; anything unexpected is a
:class:`MigrationError` naming it, never a hang (every read has the socket's
timeout) or a traceback.
"""

from __future__ import annotations

import socket
import struct
from array import array

from stellarium_core.errors import StellarError
from volt.snapshot.manifest import MAX_BYTES

HEAD = struct.Struct("<BI")
DIGEST = 32
OFFER, WANT, CHUNK, DONE, MANIFEST, READY, GO, RUNNING, FAIL, VOLUME = range(1, 11)
NAMES = {OFFER: "OFFER", WANT: "WANT", CHUNK: "CHUNK", DONE: "DONE", MANIFEST: "MANIFEST",
         READY: "READY", GO: "GO", RUNNING: "RUNNING", FAIL: "FAIL", VOLUME: "VOLUME"}
MAX_OFFER = 1 << 21            # digests: 128 GiB of RAM in 64 KiB cells
#: An OFFER's first byte: the chunks are guest RAM (stored mappable) or a disk's.
RAM, DISK = 1, 0
MAX_CHUNK = 1 << 20            # a disk chunk (FastCDC's largest is 256 KiB)
LIMITS = {OFFER: 1 + MAX_OFFER * DIGEST, WANT: MAX_OFFER * 4, CHUNK: DIGEST + MAX_CHUNK,
          DONE: 0, MANIFEST: MAX_BYTES, READY: 0, GO: 0, RUNNING: 0, FAIL: 4096,
          VOLUME: MAX_BYTES}


class MigrationError(StellarError):
    """The migration cannot go on: the peer broke the protocol, refused, or went away."""


class Wire:
    """One end of a migration connection; counts the payload bytes it sent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = 0

    def send(self, kind: int, payload: bytes | memoryview = b"") -> None:
        try:
            self.sock.sendall(HEAD.pack(kind, len(payload)))
            if payload:
                self.sock.sendall(payload)
        except OSError as exc:
            raise MigrationError(f"sending {NAMES[kind]}: {_why(exc)}") from None
        self.sent += len(payload)

    def recv(self, *expected: int) -> tuple[int, bytes]:
        """The next frame, which must be of one of the ``expected`` types (a FAIL from
        the peer is raised with its reason)."""
        kind, length = HEAD.unpack(self._exactly(HEAD.size, "a frame header"))
        if kind not in NAMES:
            raise MigrationError(f"the peer sent a frame of unknown type {kind}")
        if length > LIMITS[kind]:
            raise MigrationError(f"the peer sent a {NAMES[kind]} of {length} bytes (at most "
                                 f"{LIMITS[kind]})")
        payload = self._exactly(length, NAMES[kind])
        if kind == FAIL:
            raise MigrationError(f"the peer gave up: {payload.decode(errors='replace')}")
        if kind not in expected:
            raise MigrationError(f"the peer sent {NAMES[kind]} where "
                                 f"{' or '.join(NAMES[k] for k in expected)} belongs")
        return kind, payload

    def _exactly(self, n: int, what: str) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                got = self.sock.recv(min(n - len(buf), 1 << 20))
            except OSError as exc:
                raise MigrationError(f"receiving {what}: {_why(exc)}") from None
            if not got:
                raise MigrationError(f"the connection ended while receiving {what}")
            buf += got
        return bytes(buf)

    def fail(self, reason: str) -> None:
        """Tell the peer why, if it still listens."""
        try:
            self.send(FAIL, reason.encode()[:LIMITS[FAIL]])
        except MigrationError:
            pass


def _why(exc: OSError) -> str:
    return "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))


def offer(kind: int, digests: list[bytes]) -> bytes:
    return bytes([kind]) + b"".join(digests)


def offered(payload: bytes) -> tuple[int, list[bytes]]:
    """(RAM or DISK, the digests) of an OFFER."""
    if not payload or payload[0] not in (RAM, DISK) or (len(payload) - 1) % DIGEST:
        raise MigrationError("an OFFER must be a kind byte and whole 32-byte digests")
    return payload[0], [payload[i:i + DIGEST] for i in range(1, len(payload), DIGEST)]


def indices(payload: bytes, offered: int) -> list[int]:
    if len(payload) % 4:
        raise MigrationError("a WANT must be whole u32 indices")
    out = array("I")
    out.frombytes(payload)
    if any(i >= offered for i in out) or list(out) != sorted(set(out)):
        raise MigrationError("a WANT must name offered chunks, in order, each once")
    return list(out)


def pack_indices(want: list[int]) -> bytes:
    return array("I", want).tobytes()
