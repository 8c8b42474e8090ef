"""``stellar ingest``: store a file or a directory tree and record a minimal manifest.

The manifest is JSON stored as a chunk: ``{"format": "nebula-tree/2", "entries": [...]}``
with one entry per path (type, mode, size, ``[[digest_hex, length], ...]`` for files,
``target`` for symlinks). Files under 16 KiB, one chunk each anyway, go into Cosmic
Packs instead (``"packed": [pack_hex, slot]``): compressed together and without a
chunk's record, index row and log record each, the small files of bench/ingest's
three Debian trees take 14% less space (format 1 had no packs). Richer image
manifests belong to the volumes layer; this one exists so an ingest can be named
by one digest and read back.

All chunks of an ingest go through one :class:`~stellarium_core.nebula.batch.Batch`,
so many small files share fsyncs, and its ``put_files`` reads, hashes and
compresses them in worker processes on every core. If anything fails, the
references the ingest already made durable are released again: no manifest, no
leaked references. If the process dies instead, its reference journal lets
``gc`` release them.

What an ingest holds is recorded in ``<nebula>/ingests/<manifest hex>.refs``
(its journal, renamed there when the manifest is durable), so ``fsck`` can
count every reference; ingesting the same tree again holds nothing more.
"""

from __future__ import annotations

import io
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from stellarium_core.hookspecs import Chunker
from stellarium_core.nebula import cosmic
from stellarium_core.nebula.errors import ChunkError
from stellarium_core.nebula.store import ChunkStore
from stellarium_core.nebula.workers import Item

FORMAT = "nebula-tree/2"
FORMATS = ("nebula-tree/1", FORMAT)
#: Files strictly smaller than this (FastCDC's smallest chunk) go into Cosmic Packs.
PACKED_FILE = 16 << 10
PARTS_FORMAT = "nebula-tree-parts/1"
#: Manifests larger than this are stored in chunks, named by a small parts document.
INLINE_MANIFEST = 4 << 20
#: ``<nebula>/ingests``: one record per ingested manifest, the references it holds.
RECORDS = "ingests"


@dataclass
class IngestResult:
    """The digest of the ingested tree's manifest and what it took to store it."""

    manifest: bytes
    files: int
    bytes: int
    chunks: int


def _walk(root: Path) -> list[tuple[str, str, os.stat_result]]:
    """(relative path, full path, lstat) for root and everything under it, sorted.

    Symlinks are not followed. Plain strings rather than Path objects: a rootfs
    has tens of thousands of entries and pathlib costs more than the syscalls.
    """
    top = os.fspath(root)
    try:
        out = [(".", top, os.lstat(top))]
    except OSError as exc:
        raise ChunkError(f"cannot ingest {root}: {exc.strerror}") from None
    if not stat.S_ISDIR(out[0][2].st_mode):
        return out
    stack = [("", top)]
    while stack:
        rel, base = stack.pop()
        try:
            with os.scandir(base) as it:
                found = sorted((e.name, e.path, e.stat(follow_symlinks=False)) for e in it)
        except OSError as exc:
            raise ChunkError(f"cannot list {base}: {exc.strerror}") from None
        for name, full, st in found:
            sub = f"{rel}/{name}" if rel else name
            out.append((sub, full, st))
            if stat.S_ISDIR(st.st_mode):
                stack.append((sub, full))
    return out


class Progress(Protocol):
    """What ingest reports to: a tqdm bar fits."""

    total: float | None

    def update(self, n: float = 1) -> object: ...


def ingest(store: ChunkStore, path: str | os.PathLike[str], chunker: Chunker,
           progress: Progress | None = None) -> IngestResult:
    """Store every regular file under ``path`` and a manifest; durable when it returns.

    ``progress`` gets the total byte count first, then ``update(n)`` per file or pack.
    """
    root = Path(path)
    listing = _walk(root)
    regular = [(rel, full, st.st_size) for rel, full, st in listing
               if stat.S_ISREG(st.st_mode)]
    if progress is not None:
        progress.total = sum(n for _, _, n in regular)
    items: list[tuple[Item, int]] = [(full, n) for _, full, n in regular if not _packed(n)]
    packs = list(cosmic.groups((rel, n, full) for rel, full, n in regular if _packed(n)))
    items += [(tuple((full, n) for _, n, full in g), sum(n for _, n, _ in g)) for g in packs]
    entries: list[dict[str, Any]] = []
    chunks = 0
    with store.pending() as journal:
        batch = store.batch(journal=journal)
        try:
            stored: dict[str, list[Any]] = {}   # full path -> chunk list, or [pack, slot]
            for (item, size), parts in zip(items, batch.put_files(items, chunker),
                                           strict=True):
                chunks += len(parts)
                if isinstance(item, tuple):
                    for slot, (full, _) in enumerate(item):
                        stored[full] = [parts[0][0].hex(), slot]
                else:
                    got = sum(n for _, n in parts)
                    if got != size:
                        raise ChunkError(f"{item} changed size while being ingested "
                                         f"({size} bytes listed, {got} read); nothing "
                                         "was stored")
                    stored[item] = [[d.hex(), n] for d, n in parts]
                if progress is not None:
                    progress.update(size)
            for rel, full, st in listing:
                mode = st.st_mode
                e: dict[str, Any] = {"path": rel, "mode": stat.S_IMODE(mode), "uid": st.st_uid,
                                     "gid": st.st_gid, "mtime_ns": st.st_mtime_ns}
                if stat.S_ISREG(mode):
                    e.update(type="file", size=st.st_size)
                    e["packed" if _packed(st.st_size) else "chunks"] = stored[full]
                elif stat.S_ISDIR(mode):
                    e["type"] = "dir"
                elif stat.S_ISLNK(mode):
                    e.update(type="symlink", target=os.readlink(full))
                else:
                    e.update(type="special", kind=stat.S_IFMT(mode), rdev=st.st_rdev)
                entries.append(e)
            blob = json.dumps({"format": FORMAT, "entries": entries}, sort_keys=True,
                              separators=(",", ":")).encode()
            if len(blob) > INLINE_MANIFEST:
                parts = batch.put_stream(io.BytesIO(blob), chunker)
                blob = json.dumps({"format": PARTS_FORMAT,
                                   "parts": [[d.hex(), n] for d, n in parts]}).encode()
            digest = batch.put(blob)
            batch.commit()
        except BaseException:
            batch.rollback()
            raise
        if not journal.hand_over(store.root / RECORDS / f"{digest.hex()}.refs"):
            # The same tree was ingested before; its record holds the references.
            journal.settle()  # first: a crash now leaks, never releases twice
            batch.rollback()
    return IngestResult(digest, len(regular), sum(n for _, _, n in regular), chunks)


def _packed(size: int) -> bool:
    """Whether a file of ``size`` bytes goes into a Cosmic Pack."""
    return 0 < size < PACKED_FILE


def load_manifest(store: ChunkStore, digest: bytes) -> dict[str, Any]:
    """The manifest an ingest recorded (parts reassembled)."""
    try:
        doc = json.loads(store.get(digest))
        if isinstance(doc, dict) and doc.get("format") == PARTS_FORMAT:
            doc = json.loads(b"".join(store.get(bytes.fromhex(h)) for h, _ in doc["parts"]))
    except (ValueError, TypeError, KeyError, RecursionError):
        raise ChunkError(f"chunk {digest.hex()} is not an ingest manifest") from None
    if not isinstance(doc, dict) or doc.get("format") not in FORMATS:
        raise ChunkError(f"chunk {digest.hex()} is not an ingest manifest")
    return doc


def file_bytes(store: ChunkStore, entry: dict[str, Any]) -> bytes:
    """The bytes of a file entry of :func:`load_manifest`'s manifest, checked."""
    if "packed" in entry:
        pack, slot = entry["packed"]
        return cosmic.read_slot(store.get(bytes.fromhex(pack)), slot, store.hasher)
    return b"".join(store.get(bytes.fromhex(h)) for h, _ in entry["chunks"])
