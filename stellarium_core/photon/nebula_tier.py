"""The NEBULA chunk store as PHOTON's warm level.

PHOTON sits above NEBULA: the store's packs are the durable local copy, and
the router adds a hot tier above them and S3 below them. Reference counts stay
NEBULA's: a chunk PHOTON copies in from cold is stored with one reference that
PHOTON owns, and "deleting" from this tier releases only references PHOTON took
in this process, so a chunk a volume refers to never leaves the packs through
PHOTON (``gc`` reclaims what nobody references). The tier holds a chunk while
someone references it; one at zero references is already on its way out.
Chunks that volumes wrote
straight into the store reach S3 through :meth:`PhotonRouter.backfill`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

from stellarium_core.hookspecs import TierUsage
from stellarium_core.nebula import ChunkStore, MissingChunkError
from stellarium_core.nebula.store import META


def nebula_exists(store_path: Path) -> bool:
    """Whether ``<store_path>/nebula`` holds an initialised chunk store."""
    return (store_path / "nebula" / META).exists()


class NebulaTier:
    """A :class:`~stellarium_core.hookspecs.TierBackend` over a :class:`ChunkStore`."""

    name = "nebula"

    def __init__(self, store: ChunkStore) -> None:
        self.store = store
        self._own: set[bytes] = set()
        self._lock = threading.Lock()

    def _held(self, key: bytes) -> bool:
        """Stored and referenced: a chunk at 0 references is only waiting for gc."""
        try:
            return self.store.refs(key) > 0
        except MissingChunkError:
            return False

    def put(self, key: bytes, data: bytes | memoryview) -> None:
        if self._held(key):
            return
        digest = self.store.put(data)
        if digest != key:  # the router only hands over verified chunks
            self.store.release(digest)
            raise ValueError(f"chunk {key.hex()} hashes to {digest.hex()} in the store")
        with self._lock:
            self._own.add(key)

    def get(self, key: bytes) -> bytes | None:
        """The chunk, checked by NEBULA when ``verify_reads`` is on (CorruptChunkError)."""
        try:
            return self.store.get(key)
        except MissingChunkError:
            return None

    def contains(self, key: bytes) -> bool:
        return self._held(key)

    def delete(self, key: bytes) -> None:
        with self._lock:
            if key not in self._own:
                return  # referenced by volumes, not by us: it stays
            self._own.discard(key)
        self.store.release(key)

    def keys(self) -> Iterator[bytes]:
        return iter([d for d, e in self.store.items() if e.refs > 0])

    def usage(self) -> TierUsage:
        s = self.store.stats()
        return TierUsage(s["chunks"], s["stored_bytes"], None)

    def close(self) -> None:
        """The store belongs to its opener (usually the Host); it stays open."""
