"""Reference journals: what an unfinished operation made durable, so a crash leaks
nothing ``gc`` cannot find.

An ingest or an import stores chunks in batches, each durable with its
references, long before the manifest that will hold those references exists.
If the process dies in between, the references belong to nobody. So such an
operation keeps a journal, ``<nebula>/pending/<random>.refs``: after each
durable batch it appends one line, a JSON object ``{digest hex: references}``,
and fsyncs. The owner holds an exclusive ``flock`` on the file for its whole
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
import uuid
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


def read_counts(path: str | os.PathLike[str]) -> Counter[bytes]:
    """The references a journal or ingest record lists (summed over its lines).

    A line that does not parse is skipped: a torn last line is a batch whose
    journal entry never became durable, so its references stay leaked (never
    released twice). Raises ValueError when nothing in the file parses.
    """
    out: Counter[bytes] = Counter()
    with open(path, "rb") as fh:
        lines = fh.read().splitlines()
    good = 0
    for line in lines:
        try:
            doc = json.loads(line)
            counts = {bytes.fromhex(h): int(n) for h, n in doc.items()}
        except (ValueError, TypeError, AttributeError, RecursionError):
            continue
        if any(len(d) != 32 or n < 1 for d, n in counts.items()):
            continue
        out.update(counts)
        good += 1
    if lines and not good:
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
        """Append references that just became durable (one line, fsync'd)."""
        if not counts:
            return
        self._open()
        line = json.dumps({d.hex(): n for d, n in counts.items()}, separators=(",", ":"))
        os.write(self._fd, line.encode() + b"\n")
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
