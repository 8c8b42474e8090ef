"""Reference journals: what an unfinished operation made durable, so a crash leaks
nothing ``gc`` cannot find.

An ingest or an import stores chunks in batches, each durable with its
references, long before the manifest that will hold those references exists.
If the process dies in between, the references belong to nobody. So such an
operation keeps a journal, ``<nebula>/pending/<random>.refs``: after each
durable batch it appends one record and fsyncs. A record is ``b"NREF"``, a u32
count, count x (32-byte digest, u32 references) and a crc32 of what precedes
it in the record (little-endian); binary, it takes half the space of the JSON
lines ``{digest hex: references}`` that journals held before, which are still
read. The owner holds an exclusive ``flock`` on the file for its whole
life; a journal whose lock can be taken belongs to a dead process, and
:func:`sweep` (run by ``gc``) releases what it lists and deletes it.

The owner drops its journal (:meth:`RefJournal.settle`) *before* it writes the
manifest that takes the references over: a crash between the two leaks them
(``fsck --repair`` recounts), whereas the other order could release references
a manifest already holds. An ingest instead renames its journal into its record
(:meth:`RefJournal.hand_over`): one atomic step, no window at all.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import uuid
import zlib
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stellarium_core.fsutil import fsync_dir

if TYPE_CHECKING:
    from stellarium_core.nebula.store import ChunkStore

SUFFIX = ".refs"
#: ``<nebula>/pending``: the journals of operations still running (or dead, until swept).
PENDING = "pending"
MAGIC = b"NREF"
HEAD = struct.Struct("<4sI")
ITEM = struct.Struct("<32sI")


def encode(counts: Mapping[bytes, int]) -> bytes:
    """One journal record (see the module docstring)."""
    body = HEAD.pack(MAGIC, len(counts)) + b"".join(ITEM.pack(d, n) for d, n in counts.items())
    return body + zlib.crc32(body).to_bytes(4, "little")


def read_counts(path: str | os.PathLike[str]) -> Counter[bytes]:
    """The references a journal or ingest record lists (summed over its records).

    Reading stops at a record that is torn or damaged: a torn last record is a
    batch whose journal entry never became durable, so its references stay
    leaked (never released twice). Raises ValueError when nothing in the file
    parses.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    if data.startswith(b"{"):
        return _read_json_lines(path, data)
    out: Counter[bytes] = Counter()
    at = good = 0
    while at + HEAD.size <= len(data):
        magic, count = HEAD.unpack_from(data, at)
        end = at + HEAD.size + count * ITEM.size
        if magic != MAGIC or count == 0 or end + 4 > len(data) or \
                zlib.crc32(data[at:end]) != int.from_bytes(data[end:end + 4], "little"):
            break
        items = [ITEM.unpack_from(data, i) for i in range(at + HEAD.size, end, ITEM.size)]
        if any(n < 1 for _, n in items):
            break
        for d, n in items:
            out[d] += n
        good += 1
        at = end + 4
    if data and not good:
        raise ValueError(f"{path}: no readable reference record")
    return out


def _read_json_lines(path: str | os.PathLike[str], data: bytes) -> Counter[bytes]:
    """A journal as written before records were binary: a line that does not parse
    (a torn last line) is skipped."""
    out: Counter[bytes] = Counter()
    good = 0
    for line in data.splitlines():
        try:
            doc = json.loads(line)
            counts = {bytes.fromhex(h): int(n) for h, n in doc.items()}
        except (ValueError, TypeError, AttributeError, RecursionError):
            continue
        if any(len(d) != 32 or n < 1 for d, n in counts.items()):
            continue
        out.update(counts)
        good += 1
    if not good:
        raise ValueError(f"{path}: no readable reference line")
    return out


class RefJournal:
    """One operation's journal; the file appears with the first :meth:`record`."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / f"{uuid.uuid4().hex}{SUFFIX}"
        self._fd = -1

    def _open(self) -> None:
        """Create the file locked before it appears under its name, so a sweep never
        takes a live journal for a dead one."""
        if self._fd >= 0:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        new = self.path.with_suffix(".new")
        self._fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                           | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.rename(new, self.path)
        fsync_dir(self.dir)

    def record(self, counts: Mapping[bytes, int]) -> None:
        """Append references that just became durable (one record, fsync'd)."""
        if not counts:
            return
        self._open()
        os.write(self._fd, encode(counts))
        os.fdatasync(self._fd)

    def settle(self) -> None:
        """The references now belong to the caller: drop the journal (durably)."""
        if self._fd >= 0:
            os.unlink(self.path)
            fsync_dir(self.dir)
            os.close(self._fd)
            self._fd = -1

    def hand_over(self, dest: Path) -> bool:
        """Rename the journal to ``dest`` (a record that holds its references from
        now on); False when ``dest`` already exists, leaving the journal as it is."""
        self._open()
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(self.path, dest)
        except FileExistsError:
            return False
        os.unlink(self.path)
        fsync_dir(self.dir)
        fsync_dir(dest.parent)
        os.close(self._fd)
        self._fd = -1
        return True

    def __enter__(self) -> RefJournal:
        return self

    def __exit__(self, *_: Any) -> None:
        self.settle()


def sweep(store: ChunkStore) -> int:
    """Release what journals of dead processes list and delete them; how many.

    The caller holds the store lock, so no journal is created or handed over
    meanwhile without its owner holding the journal's own lock.
    """
    directory = store.root / PENDING
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith((SUFFIX, ".new")))
    except FileNotFoundError:
        return 0
    done = 0
    for name in names:
        path = directory / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner is alive
            if name.endswith(SUFFIX):  # a ".new" one died before its first line
                try:
                    counts = read_counts(path)
                except (OSError, ValueError):
                    counts = Counter()
                store.release_at_most(counts)
                done += 1
            os.unlink(path)
        finally:
            os.close(fd)
    if names:
        fsync_dir(directory)
    return done
