"""Errors of the chunk store; all are :class:`StellarError` so CLIs exit 1 with the message."""

from __future__ import annotations

from stellarium_core.errors import StellarError


class ChunkError(StellarError):
    """A chunk store operation failed (bad store, bad chunk, failed write)."""


class MissingChunkError(ChunkError, KeyError):
    """No chunk with this digest is in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "missing chunk"


class CorruptChunkError(ChunkError):
    """A chunk is indexed but its stored bytes are damaged, truncated or gone."""


class MissingCompressorError(ChunkError):
    """A chunk names a compressor that no installed plugin provides; its bytes are kept."""
