"""One address range composed of mappable chunks: what a VMM hands KVM as a memory slot
(a DAX base for virtio-pmem; later guest RAM restored MAP_PRIVATE from a snapshot).

The range is first reserved as anonymous read-only memory, so every place no chunk
covers reads as zeros and costs no memory (the kernel's shared zero page). Each chunk's
pages are then mapped over its place with ``MAP_FIXED`` straight from its pack: shared
and read-only, or (``private``) copy-on-write. N processes composing the same chunks
map the same page-cache pages, so the host holds one copy. Every chunk is leased (see
:mod:`~stellarium_core.nebula.mapping`) until :meth:`Composition.close`.

Chunks stored in another form (compressed, packed) cannot be mapped;
:func:`materialise` gives each a mappable copy in the store, once per store, so every
later composition on the host maps that copy.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from stellarium_core.nebula.errors import ChunkError
from stellarium_core.nebula.mapping import ChunkMapping
from stellarium_core.nebula.table import PAGE

if TYPE_CHECKING:
    from stellarium_core.nebula.store import ChunkStore

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
MAP_FAILED = ctypes.c_void_p(-1).value
MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000


def _mmap(addr: int | None, size: int, prot: int, flags: int, fd: int, offset: int) -> int:
    got = _libc.mmap(addr, size, prot, flags, fd, offset)
    if got == MAP_FAILED or got is None:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(got)


class Composition:
    """``size`` bytes at host address ``addr``, ``chunks`` mapped in place in ``maps``
    mmaps; close to unmap.

    It holds one chunk mapping per pack: a lease covers a whole pack, so one keeps
    every chunk of it in place, and a VM composing thousands of chunks keeps a few
    objects, not thousands (what a VM keeps is what limits density)."""

    def __init__(self, addr: int, size: int) -> None:
        self.addr = addr
        self.size = size
        self.chunks = 0
        self.maps = 0
        self._leases: dict[int, ChunkMapping] = {}   # pack fd -> the mapping holding it

    def _hold(self, m: ChunkMapping) -> None:
        """Keep ``m``'s pack leased; a second mapping of the same pack is given back."""
        if self._leases.setdefault(m.fd, m) is not m:
            m.release()

    def close(self) -> None:
        """Unmap the range and give the leases back (once)."""
        if self.addr:
            _libc.munmap(self.addr, self.size)
            self.addr = 0
        for m in self._leases.values():
            m.release()
        self._leases = {}

    def __enter__(self) -> Composition:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def compose(store: ChunkStore, chunks: Sequence[tuple[int, bytes]], size: int, *,
            private: bool = False) -> Composition:
    """Map ``chunks`` ((offset, digest), sorted by offset, offsets page-aligned) into a
    fresh ``size``-byte range. A chunk must end (rounded up to a page) before the next
    one starts and within ``size``. Errors (a chunk missing, not mappable, corrupt, or
    a pack truncated) are ChunkErrors raised before anything stays mapped."""
    if size <= 0 or size % PAGE:
        raise ChunkError(f"a composed range must be a positive multiple of {PAGE} bytes, "
                         f"not {size}")
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if private else 0)
    try:
        base = _mmap(None, size, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0)
    except OSError as exc:
        raise ChunkError(f"cannot reserve {size >> 20} MiB of address space: "
                         f"{exc.strerror}") from None
    done = Composition(base, size)
    share = (mmap.MAP_PRIVATE if private else mmap.MAP_SHARED) | MAP_FIXED
    run: list = []        # [fd, pack offset, range offset, length, path]: one mmap to come

    def flush() -> None:
        fd, at, offset, length, path = run
        try:
            _mmap(base + offset, length, prot, share, fd, at)
        except OSError as exc:
            raise ChunkError(f"cannot map {length} bytes at {at} of {path}: "
                             f"{exc.strerror}") from None
        done.maps += 1

    try:
        maps = store.mappings([digest for _, digest in chunks])
        for m in maps:
            done._hold(m)
        end = 0
        for (offset, digest), m in zip(chunks, maps, strict=True):
            if offset % PAGE or offset < end:
                raise ChunkError(f"chunk {digest.hex()} at {offset}: offsets must be "
                                 f"page-aligned, sorted and not overlap (the last ended "
                                 f"at {end})")
            end = offset + m.size
            if end > size:
                raise ChunkError(f"chunk {digest.hex()} at {offset} ({m.length} bytes) "
                                 f"reaches past the end of the {size}-byte range")
            done.chunks += 1
            # chunks stored one after the other in a pack, placed one after the other,
            # are one mmap (an import writes a volume's chunks in order)
            if run and run[0] == m.fd and run[1] + run[3] == m.offset \
                    and run[2] + run[3] == offset:
                run[3] += m.size
                continue
            if run:
                flush()
            run[:] = [m.fd, m.offset, offset, m.size, m.path]
        if run:
            flush()
        return done
    except BaseException:
        done.close()
        raise


def materialise(store: ChunkStore, digests: Iterable[bytes]) -> int:
    """Give each chunk not yet stored mappable a mappable copy (its bytes read and
    verified as any read); how many were copied. The copy takes no reference of its
    own. A process killed while copying leaves a journal that gives the puts'
    references back; one killed just after leaks one reference per chunk (kept
    longer), never frees a chunk in use."""
    todo = [d for d in dict.fromkeys(digests) if not store.indexed(d, mappable=True)]
    if not todo:
        return 0
    with store.pending() as journal:
        with store.batch(journal=journal) as batch:
            for d in todo:
                batch.put(store.get(d), mappable=True)
        journal.settle()
    store.release_many(dict.fromkeys(todo, 1))
    return len(todo)
