"""NEBULA, the content-addressed chunk store at the bottom of Stellarium.

Chunks are named by their BLAKE3-256 digest, stored once in append-only packs and
reference counted. See :mod:`stellarium_core.nebula.store` for the facade and
:mod:`stellarium_core.nebula.format` for the on-disk layout.
"""

from stellarium_core.nebula.batch import Batch
from stellarium_core.nebula.errors import (
    ChunkError,
    CorruptChunkError,
    MissingChunkError,
    MissingCompressorError,
)
from stellarium_core.nebula.mapping import ChunkMapping, NotMappableError
from stellarium_core.nebula.store import ChunkStore
from stellarium_core.nebula.table import Entry

__all__ = ["Batch", "ChunkError", "ChunkMapping", "ChunkStore", "CorruptChunkError", "Entry",
           "MissingChunkError", "MissingCompressorError", "NotMappableError"]
