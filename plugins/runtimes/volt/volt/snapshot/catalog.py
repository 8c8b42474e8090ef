"""Named snapshots of a host's store: ``records/snapshot/NAME.json`` -> a manifest chunk.

The record follows the core's contract for records that hold references
(:mod:`stellarium_core.holders`): its ``"chunks"`` lists the manifest chunk and
every memory chunk, one reference each, so ``gc`` keeps a snapshot restorable and
``fsck`` counts it. The volumes' TinyVol snapshots are volumes of their own (they
hold their chunks themselves); the record names them so removing the snapshot
removes them too. Replacing or removing a name releases exactly what it held.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stellarium_core.errors import StellarError, UsageError
from stellarium_core.fsutil import fsync_dir, write_atomic
from stellarium_core.holders import record_dir, records_locked
from volt.snapshot.manifest import Manifest, SnapshotError, decode
from volt.snapshot.pages import Piece

if TYPE_CHECKING:
    from stellarium_core.host import Host
    from stellarium_core.nebula.batch import Batch

OWNER = "snapshot"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


@dataclass(frozen=True)
class Snapshot:
    """A named snapshot: its name, manifest digest, when it was taken, the manifest."""

    name: str
    digest: bytes
    created: str
    manifest: Manifest

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {"name": self.name, "digest": self.digest.hex(), "created": self.created,
                "kind": m.kind, "memory_mib": m.memory_size >> 20, "vcpus": len(m.vcpus),
                "stored_mib": round(sum(p.length for p in m.pieces) / (1 << 20), 1),
                "chunks": len(m.pieces), "devices": sorted(m.devices), "cpu": m.cpu,
                "volumes": m.volumes}


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UsageError(f"bad snapshot name {str(name)[:120]!r}: use letters, digits and "
                         ". _ + - (at most 100, starting with a letter or digit)")
    return name


def save(host: Host, name: str,
         fill: Callable[[Batch], tuple[Manifest, Sequence[Piece]]]) -> Snapshot:
    """Store a snapshot and bind ``name`` to it. ``fill(batch)`` puts the memory chunks
    through ``batch`` and returns the manifest and the pieces it kept from a parent
    (referenced here, not stored again)."""
    check_name(name)
    store = host.store
    with store.pending() as journal:
        with store.batch(journal=journal) as batch:
            m, kept = fill(batch)
        refs = Counter(p.digest for p in kept)
        store.ref_many(refs)    # all or nothing: a parent chunk gc took fails it here
        journal.record(refs)
        data = m.encode()
        digest = store.put(data)
        journal.record({digest: 1})
        journal.settle()
    snap = Snapshot(name, digest, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), m)
    doc = {"name": name, "manifest": digest.hex(), "created": snap.created,
           "volumes": sorted(m.volumes.values()),
           "chunks": {"manifest": [[digest.hex(), len(data)]],
                      "memory": [[d.hex(), n] for d, n in m.chunks()]}}
    try:
        with records_locked(host.store_path, OWNER) as d:
            old = _read(d / f"{name}.json")
            write_atomic(d / f"{name}.json", (json.dumps(doc, indent=1) + "\n").encode())
    except BaseException:
        store.release_many(_held(doc))
        raise
    if old is not None:
        _drop(host, old, keep=set(doc["volumes"]))
    return snap


def _read(path: Any) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise StellarError(f"{path}: damaged snapshot record: {exc}") from None
    if not (isinstance(doc, dict) and isinstance(doc.get("manifest"), str)
            and isinstance(doc.get("chunks"), dict) and isinstance(doc.get("volumes"), list)):
        raise StellarError(f"{path}: damaged snapshot record")
    return doc


def _held(doc: dict[str, Any]) -> Counter[bytes]:
    return Counter(bytes.fromhex(p[0]) for pairs in doc["chunks"].values() for p in pairs)


def _drop(host: Host, doc: dict[str, Any], keep: Collection[str] = ()) -> None:
    """Release what a record held and delete its volumes (those not in ``keep``)."""
    from stellarium_core.volumes.volume import VolumeStore

    host.store.release_many(_held(doc))
    vols = VolumeStore.for_host(host)
    for v in doc["volumes"]:
        if v not in keep and vols.exists(v):
            vols.delete(v)


def load(host: Host, name: str) -> Snapshot:
    """The snapshot ``name``, its manifest verified and every chunk present in the store."""
    check_name(name)
    doc = _read(record_dir(host.store_path, OWNER) / f"{name}.json")
    if doc is None:
        raise SnapshotError(f"no snapshot named {name!r} (see `volt snapshot list`)")
    try:
        digest = bytes.fromhex(doc["manifest"])
        m = decode(host.store.get(digest))
    except ValueError:
        raise SnapshotError(f"snapshot {name!r}: damaged record (bad manifest digest)") from None
    except StellarError as exc:
        raise SnapshotError(f"snapshot {name!r}: {exc}") from None
    missing = host.store.missing(p.digest for p in m.pieces)
    if missing:
        raise SnapshotError(f"snapshot {name!r}: {len(missing)} memory chunk(s) are missing "
                            f"from the store (first: {missing[0].hex()})")
    return Snapshot(name, digest, str(doc.get("created", "")), m)


def names(host: Host) -> list[str]:
    return sorted(p.stem for p in record_dir(host.store_path, OWNER).glob("*.json"))


def remove(host: Host, name: str) -> None:
    """Delete the name, release what it held and delete its volume snapshots."""
    check_name(name)
    with records_locked(host.store_path, OWNER) as d:
        path = d / f"{name}.json"
        doc = _read(path)
        if doc is None:
            raise SnapshotError(f"no snapshot named {name!r} (see `volt snapshot list`)")
        path.unlink()
        fsync_dir(d)
    _drop(host, doc)
