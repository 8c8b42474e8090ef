"""Reading files and streams into chunks for the store.

Files are read (not mmap'd): what gets hashed is then exactly what gets stored,
even if someone rewrites or truncates the file meanwhile (an mmap would give torn
chunks or SIGBUS). Files up to 64 MiB are read whole, larger ones and streams in
windows, cut exactly as if they were read whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import IO

from stellarium_core.hookspecs import Chunker
from stellarium_core.nebula.errors import ChunkError

WHOLE_FILE = 64 << 20    # files up to this are read in one go, larger ones in windows

Source = str | os.PathLike[str] | IO[bytes]


def min_chunk(chunker: Chunker) -> int:
    """Length up to which ``chunker`` cannot cut: FastCDC's ``min_size``, else 0."""
    floor = chunker.params.get("min_size", 0)
    return floor if isinstance(floor, int) else 0


def chunks(src: Source, chunker: Chunker, floor: int = 0) -> Iterator[memoryview]:
    """Chunks of a path or a binary file object (see the module docstring).

    A file no longer than ``floor`` (the chunker's minimum chunk) is one chunk.
    """
    if not isinstance(src, (str, os.PathLike)):
        yield from windows(src.read, chunker, src)
        return
    try:
        fd = os.open(src, os.O_RDONLY)
    except OSError as exc:
        raise ChunkError(f"cannot read {src}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size > WHOLE_FILE:
            left = size

            def read(n: int) -> bytes:  # at most ``size`` bytes: a growing file has no end
                nonlocal left
                data = os.read(fd, min(n, left)) if left else b""
                left -= len(data)
                if not left and os.pread(fd, 1, size):
                    raise ChunkError(f"{src} grew while being read (it was {size} bytes)")
                return data

            yield from windows(read, chunker, src)
            return
        try:
            buf = memoryview(os.pread(fd, size, 0))
        except OSError as exc:
            raise ChunkError(f"cannot read {src}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if not buf:
        return
    if len(buf) <= floor:  # most files of a rootfs: one chunk, no cut call
        yield buf
        return
    pos = 0
    for n in chunker.cut(buf):
        yield buf[pos:pos + n]
        pos += n


def windows(read: Callable[[int], bytes], chunker: Chunker,
             name: object) -> Iterator[memoryview]:
    """Chunks of a stream read in windows, cut exactly as if it were read whole."""
    window = max(8 << 20, 4 * chunker.max_size)
    carry = b""
    while True:
        try:
            data = read(window)
        except OSError as exc:
            raise ChunkError(f"cannot read {name}: {exc.strerror or exc}") from None
        eof = not data
        buf = memoryview(carry + data if carry else data) if not eof else memoryview(carry)
        if not len(buf):
            return
        pos = 0
        for n in chunker.cut(buf):
            # A cut is final once max_size bytes past the chunk start are in the buffer.
            if not eof and pos + chunker.max_size > len(buf):
                break
            yield buf[pos:pos + n]
            pos += n
        if eof:
            return
        carry = bytes(buf[pos:])
