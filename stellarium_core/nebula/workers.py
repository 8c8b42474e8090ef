"""Reading, chunking, hashing and compressing files in worker processes, for a batch.

FastCDC and the Python around every file hold the GIL: measured on the three
rootfs trees, two threads were no faster than one (read + chunk 0.63 s on one,
0.78 s on two; with BLAKE3 and lz4 1.39 s on one, 1.35 s on two, at 36% more
CPU). So ingest forks worker processes for that part, one per core. A worker
reads the source files, cuts them and hashes the chunks. A chunk that the
store's index did not hold at the fork, met for the first time, it also
compresses and sends back; of any other chunk it sends only (digest, length).
On bench/ingest's trees (2 cores) the first tree is mostly new chunks and the
next two mostly known ones: with the caller compressing, it was the bottleneck
on the first and idle on the others. A worker never opens the store's files.
The calling process decides what is new (a chunk a worker took for stored that
is not, it reads again and checks), queues and commits, in order, so the
store's write order and crash safety are those of a single writer; workers die
with it (``PR_SET_PDEATHSIG``).

Files go to workers in groups of about ``GROUP_BYTES`` (one task per file would
cost more in queueing than small files cost to chunk), and at most
``READ_AHEAD`` bytes of files are in flight. An item may also be a Cosmic Pack
to build from small files (:data:`Pack`): its worker reads them, packs them and
hashes the pack, one chunk.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TYPE_CHECKING, NamedTuple

from stellarium_core.nebula.chunking import WHOLE_FILE, chunks
from stellarium_core.nebula.cosmic import pack_files
from stellarium_core.nebula.errors import ChunkError

if TYPE_CHECKING:
    from stellarium_core.hookspecs import Chunker, Hasher

GROUP_BYTES = 1 << 20
GROUP_FILES = 256
READ_AHEAD = 64 << 20
_PR_SET_PDEATHSIG = 1

#: Small files (path, size) to store as one Cosmic Pack.
Pack = tuple[tuple[str, int], ...]
#: What to store: a file, or a pack of small files.
Item = str | Pack

#: A chunk as a worker prepared it: digest, length, and the bytes to store and the
#: compressor's name if the worker took it for new (else None and "").
Prepared = tuple[bytes, int, bytes | None, str]
#: The store's compress: (stored bytes, compressor name or "").
Compress = Callable[[memoryview], tuple[bytes | memoryview, str]]


class _Worker(NamedTuple):
    hasher: Hasher
    chunker: Chunker
    floor: int
    known: Callable[[bytes], bool]
    compress: Compress
    sent: set[bytes]    # digests this worker compressed already

    def prepare(self, chunk: memoryview) -> Prepared:
        """The chunk's digest and length, with its bytes to store if it looks new."""
        d = self.hasher.digest(chunk)
        if d in self.sent or self.known(d):
            return d, len(chunk), None, ""
        self.sent.add(d)
        stored, codec = self.compress(chunk)
        return d, len(chunk), bytes(stored), codec


_worker: _Worker | None = None


def cores() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def cut(hasher: Hasher, files: Iterable[tuple[Item, int]], chunker: Chunker, floor: int,
        workers: int, known: Callable[[bytes], bool], compress: Compress
        ) -> Iterator[tuple[Item, list[Prepared] | None]]:
    """(item, [chunk as :data:`Prepared`]) for each of ``files`` (item, size), in
    order, from ``workers`` processes; None instead of chunks for a file larger than
    a whole-file read, which the caller streams itself (in its turn). A worker
    compresses (``compress``) a chunk that ``known`` (as of the fork) says is not
    stored, the first time it meets it."""
    ctx = multiprocessing.get_context("fork")
    ahead: deque[tuple[Future[list[list[Prepared] | ChunkError]] | None,
                      list[tuple[Item, int]]]] = deque()
    in_flight = 0
    todo = iter(files)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start,
                             initargs=(hasher, chunker, floor, known, compress,
                                       os.getpid())) as pool:
        try:
            group: list[tuple[Item, int]] = []
            size = 0
            done = False
            while True:
                while not done and in_flight < READ_AHEAD:
                    item = next(todo, None)
                    big = item is not None and item[1] > WHOLE_FILE
                    if item is not None and not big:
                        group.append(item)
                        size += item[1]
                    if group and (item is None or big or size >= GROUP_BYTES
                                  or len(group) >= GROUP_FILES):
                        ahead.append((pool.submit(_cut_group, [p for p, _ in group]), group))
                        in_flight += size
                        group, size = [], 0
                    if big:
                        ahead.append((None, [item]))
                    done = item is None
                if not ahead:
                    return
                fut, members = ahead.popleft()
                if fut is None:
                    yield members[0][0], None
                    continue
                in_flight -= sum(n for _, n in members)
                for (path, _), prepared in zip(members, fut.result(), strict=True):
                    if isinstance(prepared, ChunkError):
                        raise prepared
                    yield path, prepared
        finally:
            pool.shutdown(cancel_futures=True)


def _start(hasher: Hasher, chunker: Chunker, floor: int, known: Callable[[bytes], bool],
           compress: Compress, parent: int) -> None:
    """Worker set-up: what to cut, hash and compress with (inherited through fork),
    and die with the parent, so a killed ingest leaves no workers behind."""
    global _worker
    _worker = _Worker(hasher, chunker, floor, known, compress, set())
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:   # the parent died before prctl took effect
        os._exit(1)


def _cut_group(sources: list[Item]) -> list[list[Prepared] | ChunkError]:
    """Chunks of ``sources``; one that cannot be read is its error, raised by the
    caller in its turn (after the files before it)."""
    w = _worker
    assert w is not None
    out: list[list[Prepared] | ChunkError] = []
    for src in sources:
        try:
            if isinstance(src, tuple):
                out.append([w.prepare(memoryview(pack_files(src, w.hasher)))])
            else:
                out.append([w.prepare(c) for c in chunks(src, w.chunker, w.floor)])
        except ChunkError as exc:
            out.append(exc)
    return out
