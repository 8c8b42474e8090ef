"""The ``nvme`` tier: one file per chunk under a local directory, sharded by digest.

Writes go to a temporary file that is fsync'd, renamed into place and its
directory fsync'd, so ``put`` is durable when it returns and a crash leaves
either the whole chunk or nothing (``*.tmp`` files whose writer is gone are swept on
open; another process's write in flight is left alone).
The directory is the tier's only state: usage is rebuilt by one scan.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stellarium_core.config import Field, validate_params
from stellarium_core.errors import ConfigError
from stellarium_core.fsutil import abandoned_tmp, write_atomic
from stellarium_core.hookspecs import TierContext, TierFull, TierUsage, hookimpl

FIELDS = {
    "path": Field(str, "", doc="chunk directory (default: <store>/tiers/nvme); "
                               "relative paths are under the store"),
    "fsync": Field(bool, True, doc="fsync files and directories on put"),
}


class NvmeTier:
    """Chunks as files ``<root>/<hex[:2]>/<hex>``."""

    name = "nvme"

    def __init__(self, params: dict[str, Any], context: TierContext) -> None:
        self.params = validate_params(params, FIELDS)
        path = Path(self.params["path"] or "tiers/nvme").expanduser()
        self.root = path if path.is_absolute() else context.store_path / path
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"{self.root} exists and is not a directory", key="path")
        self._fsync = self.params["fsync"]
        self._sizes: dict[bytes, int] | None = None
        self._used = 0
        self._lock = threading.Lock()

    def _file(self, key: bytes) -> Path:
        h = key.hex()
        return self.root / h[:2] / h

    def _index(self) -> dict[bytes, int]:
        """Sizes of the stored chunks, from one scan on first use."""
        if self._sizes is None:
            sizes: dict[bytes, int] = {}
            if self.root.is_dir():
                for shard in self.root.iterdir():
                    if not shard.is_dir() or len(shard.name) != 2:
                        continue
                    for f in shard.iterdir():
                        if f.suffix == ".tmp":
                            if abandoned_tmp(f):
                                f.unlink(missing_ok=True)
                            continue
                        try:
                            sizes[bytes.fromhex(f.name)] = f.stat().st_size
                        except ValueError:
                            continue  # not ours
            self._sizes, self._used = sizes, sum(sizes.values())
        return self._sizes

    def put(self, key: bytes, data: bytes | memoryview) -> None:
        with self._lock:
            index = self._index()
            if key in index:
                return
        final = self._file(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(final, data, durable=self._fsync)
        except OSError as exc:
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                raise TierFull(f"nvme tier {self.root}: {exc.strerror}") from None
            raise
        with self._lock:
            index = self._index()
            if key not in index:
                index[key] = len(data)
                self._used += len(data)

    def get(self, key: bytes) -> bytes | None:
        try:
            return self._file(key).read_bytes()
        except FileNotFoundError:
            return None

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._index()

    def delete(self, key: bytes) -> None:
        self._file(key).unlink(missing_ok=True)
        with self._lock:
            self._used -= self._index().pop(key, 0)

    def keys(self) -> Iterator[bytes]:
        with self._lock:
            return iter(list(self._index()))

    def usage(self) -> TierUsage:
        with self._lock:
            index = self._index()
            return TierUsage(len(index), self._used, None)

    def close(self) -> None:
        """Nothing to release: every put is already on disk."""


@hookimpl
def stellarium_tier(name: str, params: dict[str, Any], context: TierContext) -> NvmeTier | None:
    return NvmeTier(params, context) if name == "nvme" else None
