"""Which mapped chunks some process of this host already checked, so a restore of many
clones hashes each chunk once per store, not once per process.

A mappable chunk is mapped straight from its pack, so no read checks it: the first
mapping hashes its bytes (:meth:`ChunkStore.mapping`). That is seconds per restore under
emulation, for chunks that do not change: a pack's bytes at an offset are written once.
``<nebula>/verified`` lists (pack, offset, digest) records of chunks found right; a
process appends what it checked and skips what is listed. A record names the place,
so a chunk gc moved is checked again. Damage done to a pack after its chunk was
checked is ``fsck``'s to find, as for any chunk at rest; truncation is still caught at
every mapping. The file is a cache: a record lost (no fsync) or a file that cannot be
written only costs a check again.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

RECORD = struct.Struct("<IQ32s")
NAME = "verified"


class VerifiedLog:
    """The host's checked chunk places in one store (read lazily, appended to)."""

    def __init__(self, root: Path) -> None:
        self.path = root / NAME
        self._seen: set[tuple[int, int, bytes]] = set()
        self._read = 0

    def __contains__(self, key: tuple[int, int, bytes]) -> bool:
        if key not in self._seen:
            self._catch_up()
        return key in self._seen

    def _catch_up(self) -> None:
        """Read what other processes appended since the last look (a stat when nothing)."""
        try:
            if os.stat(self.path).st_size - self._read < RECORD.size:
                return
            with open(self.path, "rb") as f:
                f.seek(self._read)
                data = f.read()
        except OSError:
            return
        whole = len(data) - len(data) % RECORD.size
        for (pack, offset, digest) in RECORD.iter_unpack(data[:whole]):
            self._seen.add((pack, offset, digest))
        self._read += whole

    def add(self, key: tuple[int, int, bytes]) -> None:
        self._seen.add(key)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return
        try:
            os.write(fd, RECORD.pack(*key))      # one write under O_APPEND: never torn apart
        except OSError:
            pass
        finally:
            os.close(fd)
