"""A descriptor chain's buffers as one stream: :class:`Reader` (driver to device) and
:class:`Writer` (device to driver).

A request's header, payload and status are spread over descriptors however the
driver liked. These helpers walk them in order over windows onto guest memory
(memoryviews, taken once when the queue validated the chain): a device reads a
header with :meth:`Reader.unpack`, passes payload windows to ``os.pwritev`` /
``preadv``, or copies chunk views into the guest with :meth:`Writer.write_from`,
one copy from source to guest RAM. Running past the end of the buffers is a
:class:`ChainTooShort` (a ValueError), never a partial write.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Self

from stellarium_core.virtio.memory import GuestMemory

if TYPE_CHECKING:
    from stellarium_core.virtio.queue import Descriptor

Buffer = bytes | bytearray | memoryview
_EMPTY = memoryview(b"")


class ChainTooShort(ValueError):
    """A request needs more bytes than the chain's buffers hold."""


class _Cursor:
    """A position in a list of windows onto guest memory."""

    __slots__ = ("_wins", "_i", "_off", "remaining")

    def __init__(self, windows: list[memoryview]) -> None:
        """Over ``windows`` (the list is taken, not copied)."""
        self._wins = windows
        self._i = self._off = 0
        self.remaining = sum(map(len, windows))

    @classmethod
    def of(cls, mem: GuestMemory, descriptors: Sequence[Descriptor]) -> Self:
        """Over ``descriptors``' buffers in ``mem`` (each range checked)."""
        return cls([mem.view(d.addr, d.length) for d in descriptors])

    def _short(self, n: int) -> ChainTooShort:
        return ChainTooShort(f"request needs {n} bytes, the chain has {self.remaining} left")

    def _windows(self, n: int) -> list[memoryview]:
        """Consume ``n`` bytes (all when negative) as windows."""
        if n < 0:
            n = self.remaining
        elif n > self.remaining:
            raise self._short(n)
        self.remaining -= n
        out = []
        while n:
            w = self._wins[self._i]
            take = min(n, len(w) - self._off)
            if take:
                out.append(w[self._off:self._off + take])
            n -= take
            self._off += take
            if self._off == len(w):
                self._i, self._off = self._i + 1, 0
        return out

    def _contiguous(self, n: int) -> memoryview | None:
        """The next ``n`` bytes as one window when they lie in one buffer (consumed)."""
        if n > self.remaining:
            raise self._short(n)
        wins, i, off = self._wins, self._i, self._off
        while i < len(wins) and off == len(wins[i]):
            i, off = i + 1, 0
        if i == len(wins):
            return _EMPTY if n == 0 else None
        w = wins[i]
        if len(w) - off < n:
            return None
        self._i, self._off = i, off + n
        self.remaining -= n
        return w[off:off + n]


class Reader(_Cursor):
    """The device-readable buffers of a chain, read front to back."""

    __slots__ = ()

    def views(self, n: int = -1) -> list[memoryview]:
        """Windows over the next ``n`` bytes (all that remain when -1): no copy."""
        return self._windows(n)

    def take(self, n: int) -> memoryview | bytes:
        """The next ``n`` bytes: a window when they lie in one buffer, else one gathered copy."""
        view = self._contiguous(n)
        return view if view is not None else b"".join(self._windows(n))

    def read(self, n: int = -1) -> bytes:
        """A copy of the next ``n`` bytes (all that remain when -1)."""
        return bytes(self.take(self.remaining if n < 0 else n))

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Fill ``buf`` from the chain; returns how many bytes that took (all of ``buf``)."""
        out, pos = memoryview(buf).cast("B"), 0
        for w in self._windows(len(out)):
            out[pos:pos + len(w)] = w
            pos += len(w)
        return pos

    def unpack(self, st: struct.Struct) -> tuple:
        """Read one fixed-size struct (a request header) without copying it first."""
        view = self._contiguous(st.size)
        return st.unpack_from(view) if view is not None else st.unpack(self.read(st.size))


class Writer(_Cursor):
    """The device-writable buffers of a chain, filled front to back; ``written`` counts
    the bytes produced (what ``add_used`` reports to the driver)."""

    __slots__ = ("written",)

    def __init__(self, windows: list[memoryview]) -> None:
        super().__init__(windows)
        self.written = 0

    def views(self, n: int = -1) -> list[memoryview]:
        """Windows over the next ``n`` bytes to fill in place (e.g. with ``os.preadv``);
        they count as written."""
        out = self._windows(n)
        self.written += sum(len(w) for w in out)
        return out

    def write(self, data: Buffer) -> None:
        """Copy ``data`` in; ChainTooShort (and nothing written) when it does not fit."""
        n = len(data)
        if not n:
            return                              # (an empty window is read-only)
        view = self._contiguous(n)
        if view is None:                        # spans buffers: copy piece by piece
            src, pos = memoryview(data).cast("B"), 0
            for w in self._windows(n):
                w[:] = src[pos:pos + len(w)]
                pos += len(w)
        else:
            view[:] = data
        self.written += n

    def write_from(self, sources: Iterable[Buffer]) -> None:
        """Copy consecutive sources in (each byte copied once, source to guest RAM)."""
        for s in sources:
            self.write(s)

    def pack(self, st: struct.Struct, *values: object) -> None:
        """Write one fixed-size struct, packed straight into guest memory when it fits
        in one buffer."""
        view = self._contiguous(st.size)
        if view is None:
            self.write(st.pack(*values))
            return
        st.pack_into(view, 0, *values)
        self.written += st.size

    def split_tail(self, n: int) -> Writer:
        """Cut the last ``n`` bytes off into their own Writer (virtio-blk's status byte),
        so filling this one can never overwrite them."""
        if n > self.remaining:
            raise ChainTooShort(f"need {n} bytes at the end, the chain has {self.remaining}")
        wins = self._wins
        last = wins[-1] if wins else _EMPTY
        if len(last) > n:                       # the usual case: cut inside the last buffer
            wins[-1] = last[:len(last) - n]
            self.remaining -= n
            return Writer([last[len(last) - n:]])
        tail: list[memoryview] = []
        cut = n
        while cut:
            w = wins[-1]
            if len(w) <= cut:
                tail.insert(0, wins.pop())
                cut -= len(w)
            else:
                tail.insert(0, w[len(w) - cut:])
                wins[-1] = w[:len(w) - cut]
                cut = 0
        self.remaining -= n
        return Writer(tail)
