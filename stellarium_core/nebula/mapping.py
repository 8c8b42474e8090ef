"""Mappable chunks, handed out as (file, offset, length) under a lease.

This is the contract for whatever composes guest memory or a DAX base from pack
ranges (virtio-pmem, PVH kernel segments, memory snapshots restored
MAP_PRIVATE):

- A chunk is mappable if it was written with ``mappable=True`` (``put``,
  ``put_stream``, ``Batch.put``): stored raw, starting at a page boundary of its
  pack, followed by zeros to the end of its last page; its record lies elsewhere
  in the pack, so no store metadata ever appears inside a mapping. fsck checks
  this; gc and fsck --repair move or copy such chunks only to mappable places.
- :meth:`ChunkStore.mapping` returns a :class:`ChunkMapping`: ``fd`` (read-only,
  close-on-exec) of ``path`` (the pack), ``offset`` (page-aligned) and ``length``
  (the chunk's bytes). Map ``size`` bytes (``length`` rounded up to a page; the
  rest is zeros) at ``offset``, shared read-only or private copy-on-write;
  :meth:`ChunkMapping.map` does that with Python's ``mmap``. Composing a base:
  one ``mmap(fd, size, offset)`` per chunk, at consecutive addresses when the
  chunks are a fixed grid of page multiples; chunks that also follow each other
  in their pack can share one mmap.
- The store checks, before handing it out, that the pack file covers
  ``offset + size``, so mapping it can never fault past the end of the file.
  The first time a process maps a chunk, its bytes (and the zeros after them)
  are read and hashed; later mappings in that process trust that check.
- While a mapping is open (until :meth:`ChunkMapping.release`, or the process
  ends, crash included: it is an ``flock`` on the fd), the chunk's pack is leased:
  ``gc`` neither punches holes in it, nor rewrites it, nor deletes it; its chunks
  with no references stay until a gc runs without the lease. All mappings of one
  pack in a process share one fd. An mmap stays valid after ``release`` or
  ``ChunkStore.close`` (the kernel keeps the file), but without the lease a later
  gc may punch a chunk no manifest still references: hold the lease as long as
  the mmap is used. (A Python ``mmap``, e.g. from :meth:`ChunkMapping.map`, keeps
  a duplicate of the fd, and so the lease, until it is closed.)
- Packs are append-only and the store never truncates or rewrites bytes of an
  indexed chunk. A pack truncated by someone else is damage: the next
  ``mapping`` (and ``get``/``view``) of its chunks is a CorruptChunkError naming
  the pack, never a SIGBUS; but pages of an existing mapping past the new end
  fault with SIGBUS when touched, which no file mapping can prevent. Give
  untrusted processes no write access to a store that VMs map from.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stellarium_core.nebula.errors import ChunkError
from stellarium_core.nebula.format import align
from stellarium_core.nebula.table import PAGE


class NotMappableError(ChunkError):
    """The chunk is stored in a form that cannot be mapped (compressed, packed)."""


class ChunkMapping:
    """Where one mappable chunk's bytes are; holds its pack's lease until released."""

    def __init__(self, digest: bytes, path: Path, fd: int, offset: int, length: int,
                 release: Callable[[], None]) -> None:
        self.digest = digest
        self.path = path
        self.fd = fd
        self.offset = offset
        self.length = length
        self._release: Callable[[], None] | None = release

    @property
    def size(self) -> int:
        """What to map: ``length`` rounded up to a page (the tail is zeros)."""
        return align(self.length, PAGE)

    def map(self, private: bool = False) -> mmap.mmap:
        """The chunk mapped read-only and shared, or (``private``) copy-on-write."""
        if self._release is None:
            raise ChunkError(f"mapping of chunk {self.digest.hex()} was released")
        return mmap.mmap(self.fd, self.size, offset=self.offset,
                         access=mmap.ACCESS_COPY if private else mmap.ACCESS_READ)

    def release(self) -> None:
        """Give the lease back (once); mmaps already made stay valid."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> ChunkMapping:
        return self

    def __exit__(self, *_: Any) -> None:
        self.release()


class Leases:
    """Open lease fds by pack, counted by the mappings that use them."""

    def __init__(self, open_lease: Callable[[int], int]) -> None:
        self._open = open_lease
        self._held: dict[int, list[int]] = {}   # pack -> [fd, mappings]

    def take(self, pack: int, mu: Any) -> int:
        """An fd of ``pack`` holding its lease; may wait for a gc working on it
        (without holding ``mu``, the store's mutex)."""
        with mu:
            held = self._held.get(pack)
            if held is not None:
                held[1] += 1
                return held[0]
        fd = self._open(pack)
        with mu:
            held = self._held.get(pack)
            if held is not None:   # another thread was quicker
                os.close(fd)
                held[1] += 1
                return held[0]
            self._held[pack] = [fd, 1]
            return fd

    def give(self, pack: int, mu: Any) -> None:
        with mu:
            held = self._held[pack]
            held[1] -= 1
            if not held[1]:
                del self._held[pack]
                os.close(held[0])
