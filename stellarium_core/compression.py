"""The core's default chunk compressor, lz4 (block format), published as the ``lz4``
plugin of ``stellarium.compressors``.

It lives in the core, like the blake3 hasher, because a store must read what it
wrote with its default settings; other compressors (``zstd``) are plugin
distributions found through the same entry point. python-lz4 releases the GIL
while it compresses, so ingest threads compress in parallel.
"""

from __future__ import annotations

from typing import Any

import lz4.block

from stellarium_core.config import validate_params
from stellarium_core.errors import PluginError
from stellarium_core.hookspecs import Compressor, hookimpl
from stellarium_core.plugins import Registry

#: The ``[compressor] name`` that stores chunks uncompressed (no plugin).
NONE = "none"


class Lz4Compressor:
    """lz4 blocks without a size header: the chunk record holds the size."""

    name = "lz4"

    def __init__(self, params: dict[str, Any]) -> None:
        self._params = validate_params(params, {})

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._params)

    def compress(self, data: bytes | memoryview) -> bytes:
        return lz4.block.compress(data, store_size=False)

    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        try:
            out = lz4.block.decompress(data, uncompressed_size=size)
        except lz4.block.LZ4BlockError as exc:
            raise ValueError(f"lz4: {exc}") from None
        if len(out) != size:
            raise ValueError(f"lz4 bytes decompress to {len(out)} bytes, not {size}")
        return out


@hookimpl
def stellarium_compressor(name: str, params: dict[str, Any]) -> Lz4Compressor | None:
    return Lz4Compressor(params) if name == "lz4" else None


class Compressors:
    """Compressors by name, for reading chunks: ``configured`` for its own name, any
    other installed compressor with its default parameters (loaded on first use)."""

    def __init__(self, configured: Compressor | None = None,
                 registry: Registry | None = None) -> None:
        self._cache: dict[str, Compressor] = {}
        if configured is not None:
            self._cache[configured.name] = configured
        self._registry = registry

    def __call__(self, name: str) -> Compressor:
        """The compressor called ``name``; PluginError naming what is installed when
        no plugin has that name."""
        c = self._cache.get(name)
        if c is None:
            if self._registry is None:
                self._registry = Registry()
            c = self._registry.create("compressor", name, {})
            if c.name != name:
                raise PluginError(f"compressor plugin {name!r} calls itself {c.name!r}")
            self._cache[name] = c
        return c
