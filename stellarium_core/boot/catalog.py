"""Named boot manifests of a host's store: ``records/boot/NAME.json`` -> a manifest chunk.

The manifest itself is a NEBULA chunk (content addressed: its digest is its
name in the store, and every load verifies it). The named record follows the
core's contract for records that hold references (:mod:`stellarium_core.holders`):
its ``"chunks"`` lists the manifest chunk and every chunk the manifest names
(kernel, initrd, prefetch set), one reference each, so ``gc`` keeps a recorded
boot bootable and ``fsck`` counts it. Removing or replacing a name releases
exactly what its record held.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stellarium_core.boot.manifest import Blob, BootManifest, BootManifestError, decode
from stellarium_core.errors import StellarError, UsageError
from stellarium_core.fsutil import fsync_dir, write_atomic
from stellarium_core.holders import record_dir, records_locked

if TYPE_CHECKING:
    from stellarium_core.host import Host

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
#: Values of ``volt run --boot`` that choose a boot protocol, so no manifest may be named so.
RESERVED = ("auto", "linux64", "pvh")
OWNER = "boot"


class NoSuchManifest(StellarError):
    """No manifest has that name (or digest)."""


@dataclass(frozen=True)
class Recorded:
    """A named manifest: its name, digest, when it was recorded, and the manifest."""

    name: str
    digest: bytes
    recorded: str
    manifest: BootManifest

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {"name": self.name, "digest": self.digest.hex(), "recorded": self.recorded,
                "kernel": m.kernel.digest, "initrd": m.initrd.digest if m.initrd else None,
                "root": {m.root_kind: m.root}, "cmdline": m.cmdline,
                "memory_mib": m.memory_mib, "vcpus": m.vcpus, "prefetch": len(m.prefetch)}


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or name in RESERVED:
        raise UsageError(f"bad boot manifest name {name!r}: use letters, digits and . _ + - "
                         "(at most 128, starting with a letter or digit; not "
                         f"{', '.join(RESERVED)})")
    return name


def _dir(host: Host) -> Path:
    return record_dir(host.store_path, OWNER)


def _locked(host: Host) -> AbstractContextManager[Path]:
    return records_locked(host.store_path, OWNER)


def check(host: Host, m: BootManifest) -> None:
    """Refuse, before any boot, a manifest whose chunks or root the store lacks."""
    store = host.store
    missing = store.missing(m.chunks())
    if missing:
        raise BootManifestError(f"boot manifest names {len(missing)} chunk(s) the store does "
                                f"not hold (first: {missing[0].hex()}); record it again")
    if m.root_kind == "volume":
        from stellarium_core.volumes.volume import VolumeStore

        if not VolumeStore.for_host(host).exists(m.root):
            raise BootManifestError(f"boot manifest's root volume {m.root!r} does not exist "
                                    "(see `stellar vol ls`)")
    else:
        from stellarium_core.distribution import ImageStore

        try:
            ImageStore.for_host(host).resolve(m.root)
        except StellarError as exc:
            raise BootManifestError(f"boot manifest's root image: {exc}") from None


def record(host: Host, name: str, m: BootManifest) -> Recorded:
    """Check ``m``, store it and bind ``name`` to it (replacing what the name held)."""
    check_name(name)
    m = decode(m.encode())
    check(host, m)
    store = host.store
    lengths = {d: store.size(d) for d in m.prefetch}
    chunks: dict[str, list[list[Any]]] = {
        "kernel": [[d.hex(), n] for d, n in m.kernel.chunks],
        "initrd": [[d.hex(), n] for d, n in m.initrd.chunks] if m.initrd else [],
        "prefetch": [[d.hex(), lengths[d]] for d in m.prefetch]}
    refs = Counter(m.chunks())
    data = m.encode()
    with store.pending() as journal:
        store.ref_many(refs)     # all or nothing: a chunk gc took meanwhile fails it here
        journal.record(refs)
        try:
            digest = store.put(data)
        except BaseException:
            store.release_many(refs)
            raise
        journal.record({digest: 1})
        journal.settle()
    refs[digest] += 1
    chunks["manifest"] = [[digest.hex(), len(data)]]
    rec = Recorded(name, digest, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), m)
    doc = {"name": name, "manifest": digest.hex(), "recorded": rec.recorded, "chunks": chunks}
    try:
        with _locked(host) as d:
            old = _read_record(d / f"{name}.json")
            write_atomic(d / f"{name}.json", (json.dumps(doc, indent=1) + "\n").encode())
    except BaseException:
        store.release_many(refs)
        raise
    if old is not None:
        store.release_many(_held(old))
    return rec


def _read_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise StellarError(f"{path}: damaged boot record: {exc}") from None
    if (not isinstance(doc, dict) or not isinstance(doc.get("manifest"), str)
            or not isinstance(doc.get("chunks"), dict)):
        raise StellarError(f"{path}: damaged boot record: not a boot record")
    return doc


def _held(doc: dict[str, Any]) -> Counter[bytes]:
    return Counter(bytes.fromhex(p[0]) for pairs in doc["chunks"].values() for p in pairs)


def _load(host: Host, path: Path) -> Recorded:
    doc = _read_record(path)
    if doc is None:
        raise NoSuchManifest(f"no boot manifest named {path.stem!r} (see `volt boot list`)")
    try:
        digest = bytes.fromhex(doc["manifest"])
        data = host.store.get(digest)
    except ValueError:
        raise StellarError(f"{path}: damaged boot record: bad manifest digest") from None
    except StellarError as exc:
        raise BootManifestError(f"boot manifest {path.stem!r}: {exc}") from None
    try:
        m = decode(data)
    except BootManifestError as exc:
        raise BootManifestError(f"boot manifest {path.stem!r}: {exc}") from None
    return Recorded(path.stem, digest, str(doc.get("recorded", "")), m)


def load(host: Host, ref: str) -> Recorded:
    """A named manifest, or the one whose digest ``ref`` prefixes (8+ hex digits), verified
    and checked against the store (every chunk present, the root there)."""
    d = _dir(host)
    if NAME.fullmatch(ref) and (d / f"{ref}.json").is_file():
        rec = _load(host, d / f"{ref}.json")
    elif re.fullmatch(r"[0-9a-f]{64}", ref) and host.store.contains(bytes.fromhex(ref)):
        try:
            rec = Recorded(ref, bytes.fromhex(ref), "", decode(host.store.get(bytes.fromhex(ref))))
        except StellarError as exc:
            raise BootManifestError(f"boot manifest {ref[:16]}: {exc}") from None
    else:
        hits = [p for p in sorted(d.glob("*.json")) if re.fullmatch(r"[0-9a-f]{8,64}", ref)
                and str((_read_record(p) or {}).get("manifest", "")).startswith(ref)]
        if len(hits) != 1:
            if hits:
                raise UsageError(f"digest prefix {ref} is ambiguous")
            raise NoSuchManifest(f"no boot manifest named or hashed {ref!r} "
                                 "(see `volt boot list`)")
        rec = _load(host, hits[0])
    check(host, rec.manifest)
    return rec


def list_manifests(host: Host) -> list[Recorded]:
    return [_load(host, p) for p in sorted(_dir(host).glob("*.json"))]


def remove(host: Host, name: str) -> str:
    """Delete the name and release what its record held (gc reclaims the space)."""
    check_name(name)
    with _locked(host) as d:
        path = d / f"{name}.json"
        doc = _read_record(path)
        if doc is None:
            raise NoSuchManifest(f"no boot manifest named {name!r} (see `volt boot list`)")
        path.unlink()
        fsync_dir(d)
    host.store.release_many(_held(doc))
    return doc["manifest"]


def read_blob(host: Host, blob: Blob, what: str) -> bytes:
    """A kernel or initrd reassembled from its chunks and checked against its digest."""
    data = b"".join(host.store.get(d) for d, _n in blob.chunks)
    if len(data) != blob.size or host.hasher.digest(data).hex() != blob.digest:
        raise BootManifestError(f"{what} {blob.digest[:16]}: reassembled bytes do not match "
                                "its recorded digest")
    return data
