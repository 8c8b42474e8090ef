"""A descriptor chain's buffers as one stream: :class:`Reader` (driver to device) and
:class:`Writer` (device to driver).

A request's header, payload and status are spread over descriptors however the
driver liked. These helpers walk them in order and hand out windows onto guest
memory (memoryviews, no copy): a device reads a header with :meth:`Reader.unpack`,
passes payload windows to ``os.pwritev`` / ``preadv``, or copies chunk views into
the guest with :meth:`Writer.write_from`, one copy from source to guest RAM.
Running past the end of the buffers is a :class:`ChainTooShort` (a ValueError),
never a partial write.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from stellarium_core.virtio.memory import GuestMemory

if TYPE_CHECKING:
    from stellarium_core.virtio.queue import Descriptor

Buffer = bytes | bytearray | memoryview


class ChainTooShort(ValueError):
    """A request needs more bytes than the chain's buffers hold."""


class _Cursor:
    """A position in a list of guest buffers; windows are made one buffer at a time."""

    __slots__ = ("_mem", "_descs", "_i", "_off", "remaining")

    def __init__(self, mem: GuestMemory, descriptors: Sequence[Descriptor]) -> None:
        self._mem, self._descs = mem, descriptors
        self._i = self._off = 0
        self.remaining = sum(d.length for d in descriptors)

    def _windows(self, n: int) -> list[memoryview]:
        """Consume ``n`` bytes (all when negative) as windows onto guest memory."""
        if n < 0:
            n = self.remaining
        elif n > self.remaining:
            raise ChainTooShort(f"request needs {n} bytes, the chain has {self.remaining} left")
        self.remaining -= n
        descs, mem, out = self._descs, self._mem, []
        while n:
            d = descs[self._i]
            take = min(n, d.length - self._off)
            if take:
                out.append(mem.view(d.addr + self._off, take))
            n -= take
            self._off += take
            if self._off == d.length:
                self._i, self._off = self._i + 1, 0
        return out

    def _contiguous(self, n: int) -> memoryview | None:
        """The next ``n`` bytes as one window when they lie in one buffer (consumed)."""
        if n > self.remaining:
            raise ChainTooShort(f"request needs {n} bytes, the chain has {self.remaining} left")
        while self._i < len(self._descs) and self._off == self._descs[self._i].length:
            self._i, self._off = self._i + 1, 0
        if self._i == len(self._descs):
            return memoryview(b"") if n == 0 else None
        d = self._descs[self._i]
        if d.length - self._off < n:
            return None
        view = self._mem.view(d.addr + self._off, n)
        self._off += n
        self.remaining -= n
        return view


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
        for w in self._windows(len(buf)):
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

    def __init__(self, mem: GuestMemory, descriptors: Sequence[Descriptor]) -> None:
        super().__init__(mem, descriptors)
        self.written = 0

    def views(self, n: int = -1) -> list[memoryview]:
        """Windows over the next ``n`` bytes to fill in place (e.g. with ``os.preadv``);
        they count as written."""
        out = self._windows(n)
        self.written += sum(len(w) for w in out)
        return out

    def write(self, data: Buffer) -> None:
        """Copy ``data`` in; ChainTooShort (and nothing written) when it does not fit."""
        src = memoryview(data).cast("B")
        pos = 0
        for w in self.views(len(src)):
            w[:] = src[pos:pos + len(w)]
            pos += len(w)

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
        descs = list(self._descs[self._i:])
        if descs and self._off:
            d = descs[0]
            descs[0] = type(d)(d.addr + self._off, d.length - self._off, d.write)
        head, tail, cut = [], [], n
        for d in reversed(descs):
            if cut >= d.length:
                tail.insert(0, d)
                cut -= d.length
            elif cut:
                keep = d.length - cut
                head.insert(0, type(d)(d.addr, keep, d.write))
                tail.insert(0, type(d)(d.addr + keep, cut, d.write))
                cut = 0
            else:
                head.insert(0, d)
        self._descs, self._i, self._off = head, 0, 0
        self.remaining -= n
        return Writer(self._mem, tail)
