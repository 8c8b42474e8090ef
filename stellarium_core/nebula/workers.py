"""Reading, chunking and hashing files in worker processes, for a batch.

FastCDC and the Python around every file hold the GIL: measured on the three
rootfs trees, two threads were no faster than one (read + chunk 0.63 s on one,
0.78 s on two; with BLAKE3 and lz4 1.39 s on one, 1.35 s on two, at 36% more
CPU). So ingest forks worker processes for that part. A worker reads the source
files, cuts them and hashes the chunks, and sends back only (digest, length)
per chunk: sending chunk bytes back through pipes cost more CPU (pickling, two
copies) than reading the few new ones again, and a compressing thread in the
caller slowed its other work down (GIL handoffs). It never opens the store's
files. The calling process decides what is new, reads, checks and compresses
those chunks, queues and commits, in order, so the store's write order and crash
safety are those of a single writer; workers die with it (``PR_SET_PDEATHSIG``).

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
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TYPE_CHECKING

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

_worker: tuple[Hasher, Chunker, int] | None = None


def cores() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def cut(hasher: Hasher, files: Iterable[tuple[Item, int]], chunker: Chunker,
        floor: int, workers: int) -> Iterator[tuple[Item, list[tuple[bytes, int]] | None]]:
    """(item, [(digest, length)]) for each of ``files`` (item, size), in order,
    from ``workers`` processes; None instead of chunks for a file larger than a
    whole-file read, which the caller streams itself (in its turn)."""
    ctx = multiprocessing.get_context("fork")
    ahead: deque[tuple[Future[list[list[tuple[bytes, int]] | ChunkError]] | None,
                      list[tuple[Item, int]]]] = deque()
    in_flight = 0
    todo = iter(files)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start,
                             initargs=(hasher, chunker, floor, os.getpid())) as pool:
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


def _start(hasher: Hasher, chunker: Chunker, floor: int, parent: int) -> None:
    """Worker set-up: what to cut and hash with (inherited through fork), and die
    with the parent, so a killed ingest leaves no workers behind."""
    global _worker
    _worker = (hasher, chunker, floor)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:   # the parent died before prctl took effect
        os._exit(1)


def _cut_group(sources: list[Item]) -> list[list[tuple[bytes, int]] | ChunkError]:
    """Chunks of ``sources``; one that cannot be read is its error, raised by the
    caller in its turn (after the files before it)."""
    assert _worker is not None
    hasher, chunker, floor = _worker
    out: list[list[tuple[bytes, int]] | ChunkError] = []
    for src in sources:
        try:
            if isinstance(src, tuple):
                pack = pack_files(src, hasher)
                out.append([(hasher.digest(pack), len(pack))])
            else:
                out.append([(hasher.digest(c), len(c)) for c in chunks(src, chunker, floor)])
        except ChunkError as exc:
            out.append(exc)
    return out
