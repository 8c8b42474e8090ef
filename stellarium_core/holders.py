"""Who holds NEBULA references: every manifest and record of a store that counts chunks.

NEBULA keeps a reference count per chunk; what the counts stand for lives above
it, in files. Reading them all (a census) gives what every count should be, so
``fsck`` can check the index and ``fsck --repair`` can set it right after the
index was damaged, and ``gc`` never drops a chunk something still names.

Holders, under the store path, and the references each holds:

- ``volumes/*.tinyvol``, ``volumes/bases/*.tinyvol``: a volume or ShareVol base,
  one per chunk it lists (ZERO entries none);
- ``volumes/images/*.tinyvol``: an image's VM disk (TinyVol version 2), one per
  distinct chunk its extents read from;
- ``volumes/trees/*.json``, ``images/manifests/*.json``: a tree (layer) manifest,
  one per chunk per file entry and one per Cosmic Pack; image manifests none;
- ``images/pulls/*.json``: an unfinished pull, one per blob it lists;
- ``nebula/ingests/*.refs``, ``nebula/pending/*.refs``: an ingest, or an operation
  still running (or dead, until ``gc`` sweeps it), what its lines list;
- ``records/<owner>/*.json``: records of plugins. The core cannot import a
  plugin, so this is the contract instead: a JSON object whose ``"chunks"``
  maps labels to ``[[digest hex, length], ...]`` holds one reference per pair
  (Volt's kernel registry keeps its kernels there, and PHOTON, under
  ``records/photon``, the chunks it copied into NEBULA from S3 or a peer).

A file that cannot be read is listed as damaged, and so is one that ``fsck
--repair`` set aside (``*.damaged``): while any exists the census is
incomplete, and counts are raised to it but never lowered.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from stellarium_core.errors import StellarError
from stellarium_core.hookspecs import Hasher
from stellarium_core.nebula.ingest import RECORDS as INGESTS
from stellarium_core.nebula.pending import PENDING, read_counts
from stellarium_core.volumes import filetree, tinyvol

#: What ``fsck --repair`` renames an unreadable holder to (no holder glob matches it).
SET_ASIDE = ".damaged"
#: Where plugins keep records that hold chunk references (see the module docstring).
RECORDS = "records"


@dataclass
class Census:
    """References per chunk that the holders account for, and what could not be read."""

    held: Counter[bytes] = field(default_factory=Counter)
    holders: int = 0
    damaged: dict[Path, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.damaged


def _tinyvol(path: Path, hasher: Hasher) -> Counter[bytes]:
    data = path.read_bytes()
    m = tinyvol.decode(data)
    if path.parent.name == "bases" and hasher.digest(data).hex() != path.stem:
        raise tinyvol.ManifestError("does not match its digest (corrupt)")
    return Counter(r.digest for r in m.refs.values() if not r.zero)


def _image_disk(path: Path, hasher: Hasher) -> Counter[bytes]:
    disk = tinyvol.decode_extents(path.read_bytes())
    if disk.image.hex() != path.name.removesuffix(".tinyvol"):
        raise tinyvol.ManifestError("was built for another image (misfiled)")
    return Counter(disk.digests())


def _manifest(path: Path, hasher: Hasher) -> Counter[bytes]:
    """A tree manifest's references; an image manifest holds none."""
    data = path.read_bytes()
    if hasher.digest(data).hex() != path.stem:
        raise tinyvol.ManifestError("does not match its digest (corrupt)")
    doc = json.loads(data)
    if isinstance(doc, dict) and doc.get("format") != filetree.FORMAT:
        return Counter()
    return filetree.references(filetree.Manifest.decode(data))


def _pull(path: Path, hasher: Hasher) -> Counter[bytes]:
    hexes = json.loads(path.read_bytes())
    if not isinstance(hexes, list):
        raise ValueError("not a list of blob digests")
    return Counter(_digest(h) for h in hexes)


def _record(path: Path, hasher: Hasher) -> Counter[bytes]:
    doc = json.loads(path.read_bytes())
    chunks = doc.get("chunks") if isinstance(doc, dict) else None
    if not isinstance(chunks, dict):
        raise ValueError('no "chunks" object')
    out: Counter[bytes] = Counter()
    for label, pairs in chunks.items():
        if not isinstance(pairs, list):
            raise ValueError(f"chunks of {label!r} are not a list")
        out.update(_digest(p[0]) for p in pairs)
    return out


def _digest(h: object) -> bytes:
    if not isinstance(h, str) or len(h) != 64:
        raise ValueError(f"{h!r:.80} is not a chunk digest")
    return bytes.fromhex(h)


def record_dir(store_path: Path, owner: str) -> Path:
    """``<store>/records/<owner>``, made on first use in an initialised store."""
    top = store_path / RECORDS
    if not top.is_dir():
        raise StellarError(f"no record directory at {top} (run `stellar host init`)")
    d = top / owner
    d.mkdir(exist_ok=True)
    return d


@contextmanager
def records_locked(store_path: Path, owner: str) -> Iterator[Path]:
    """:func:`record_dir` under its owner's exclusive lock, for a read-modify-write of a
    record (replace or remove) that must release exactly what the old one held."""
    d = record_dir(store_path, owner)
    with open(d / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield d


#: (directory under the store, file pattern, reader)
_KINDS: tuple[tuple[str, str, Callable[[Path, Hasher], Counter[bytes]]], ...] = (
    ("volumes", "*.tinyvol", _tinyvol),
    ("volumes/bases", "*.tinyvol", _tinyvol),
    ("volumes/images", "*.tinyvol", _image_disk),
    ("volumes/trees", "*.json", _manifest),
    ("images/manifests", "*.json", _manifest),
    ("images/pulls", "*.json", _pull),
    (f"nebula/{INGESTS}", "*.refs", lambda p, _: read_counts(p)),
    (f"nebula/{PENDING}", "*.refs", lambda p, _: read_counts(p)),
    (f"{RECORDS}/*", "*.json", _record),
)


def _files(store_path: Path, directory: str, pattern: str) -> Iterator[Path]:
    dirs = store_path.glob(directory) if "*" in directory else [store_path / directory]
    for d in sorted(dirs):
        for p in sorted(d.glob(pattern)):
            if not p.name.startswith("."):
                yield p
        yield from sorted(d.glob("*" + SET_ASIDE))


def census(store_path: Path, hasher: Hasher) -> Census:
    """Read every holder of the store at ``store_path``."""
    c = Census()
    for directory, pattern, read in _KINDS:
        for p in _files(store_path, directory, pattern):
            if p.name.endswith(SET_ASIDE):
                c.damaged[p] = "set aside by `stellar fsck --repair`; the chunks it held " \
                               "keep their references until you delete it"
                continue
            try:
                c.held.update(read(p, hasher))
            except FileNotFoundError:
                continue  # removed meanwhile
            except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                    RecursionError, StellarError) as exc:
                c.damaged[p] = f"unreadable: {exc}"
                continue
            c.holders += 1
    return c


def set_aside(c: Census) -> list[Path]:
    """Rename unreadable holders to ``*.damaged``, so the operations that would trip
    over them (``image rm``, ``vol rm``) work; what they held stays referenced."""
    moved = []
    for p in c.damaged:
        if not p.name.endswith(SET_ASIDE):
            dest = p.with_name(p.name + SET_ASIDE)
            os.replace(p, dest)
            moved.append(dest)
    return moved
