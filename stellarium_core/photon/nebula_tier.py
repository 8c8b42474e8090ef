"""The NEBULA chunk store as PHOTON's warm level.

PHOTON sits above NEBULA: the store's packs are the durable local copy, and
the router adds a hot tier above them and S3 (and peers) below them. Reference
counts stay NEBULA's: a chunk PHOTON copies in from below is stored with one
reference that PHOTON holds, and "deleting" from this tier releases only such
references, so a chunk a volume refers to never leaves the packs through PHOTON
(``gc`` reclaims what nobody references). The tier holds a chunk while someone
references it; one at zero references is already on its way out. Chunks that
volumes wrote straight into the store reach S3 through :meth:`PhotonRouter.backfill`.

PHOTON's references are a holder like any other (see :mod:`stellarium_core.holders`):
``<store>/records/photon/warm-<xx>.json`` list them, sharded by the digest's first
byte, so every process shares them and ``fsck`` counts them. A reference is taken
before its record lists it and released after its record dropped it: a crash in
between leaks one reference (``fsck`` says so), never frees a listed chunk.
"""

from __future__ import annotations

import fcntl
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stellarium_core.errors import StellarError
from stellarium_core.fsutil import write_atomic
from stellarium_core.hookspecs import TierUsage
from stellarium_core.nebula import ChunkStore, MissingChunkError
from stellarium_core.nebula.store import META

OWNER = "photon"  # <store>/records/<OWNER>: the holder of PHOTON's references


def nebula_exists(store_path: Path) -> bool:
    """Whether ``<store_path>/nebula`` holds an initialised chunk store."""
    return (store_path / "nebula" / META).exists()


class NebulaTier:
    """A :class:`~stellarium_core.hookspecs.TierBackend` over a :class:`ChunkStore`."""

    name = "nebula"

    def __init__(self, store: ChunkStore, records: Path) -> None:
        """``records`` is the store's records directory (``<store>/records``)."""
        self.store = store
        self.verified = store.verify_reads  # NEBULA hashes what it reads: no second check
        self._dir = records / OWNER
        self._lock = threading.Lock()

    # -- the record of PHOTON's references ------------------------------------------

    def _shard(self, key: bytes) -> Path:
        return self._dir / f"warm-{key[0]:02x}.json"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Every process's changes to the records, one at a time."""
        self._dir.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self._dir / "lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def _listed(self, shard: Path) -> dict[str, int]:
        try:
            doc = json.loads(shard.read_bytes())
            return {h: n for h, n in doc["chunks"]["warm"]}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, RecursionError) as exc:
            raise StellarError(f"{shard}: damaged PHOTON record ({type(exc).__name__}); "
                               "`stellar fsck --repair` sets it aside") from None

    def _save(self, shard: Path, listed: dict[str, int]) -> None:
        doc = {"chunks": {"warm": [[h, n] for h, n in sorted(listed.items())]}}
        write_atomic(shard, json.dumps(doc).encode())

    def held(self, key: bytes) -> bool:
        """Whether PHOTON holds a reference on ``key`` (a copy it brought in)."""
        return key.hex() in self._listed(self._shard(key))

    def _held(self, key: bytes) -> bool:
        """Stored and referenced: a chunk at 0 references is only waiting for gc."""
        try:
            return self.store.refs(key) > 0
        except MissingChunkError:
            return False

    def put(self, key: bytes, data: bytes | memoryview) -> None:
        if self._held(key):
            return
        shard = self._shard(key)
        with self._locked():
            listed = self._listed(shard)
            if key.hex() in listed:
                return
            digest = self.store.put(data)
            if digest != key:  # the router only hands over verified chunks
                self.store.release(digest)
                raise ValueError(f"chunk {key.hex()} hashes to {digest.hex()} in the store")
            listed[key.hex()] = len(data)
            self._save(shard, listed)

    def get(self, key: bytes) -> bytes | None:
        """The chunk, checked by NEBULA when ``verify_reads`` is on (CorruptChunkError)."""
        try:
            return self.store.get(key)
        except MissingChunkError:
            return None

    def view(self, key: bytes) -> memoryview | None:
        """Zero-copy over the pack for an uncompressed chunk (see :meth:`ChunkStore.view`)."""
        try:
            return self.store.view(key)
        except MissingChunkError:
            return None

    def contains(self, key: bytes) -> bool:
        return self._held(key)

    def delete(self, key: bytes) -> None:
        shard = self._shard(key)
        with self._locked():
            listed = self._listed(shard)
            if listed.pop(key.hex(), None) is None:
                return  # referenced by volumes, not by us: it stays
            self._save(shard, listed)
        self.store.release(key)

    def keys(self) -> Iterator[bytes]:
        return iter([d for d, e in self.store.items() if e.refs > 0])

    def usage(self) -> TierUsage:
        s = self.store.stats()
        return TierUsage(s["chunks"], s["stored_bytes"], None)

    def close(self) -> None:
        """The store belongs to its opener (usually the Host); it stays open."""
