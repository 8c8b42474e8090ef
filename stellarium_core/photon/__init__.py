"""PHOTON: the tier router (hot memory, warm local disk, cold S3) above NEBULA."""

from stellarium_core.photon.nebula_tier import NebulaTier
from stellarium_core.photon.policy import Policy
from stellarium_core.photon.router import (
    LEVELS,
    ChunkCorrupt,
    ChunkNotFound,
    PhotonRouter,
    RemoteWriteError,
    confined_paths,
    from_host,
    meminfo,
)
from stellarium_core.photon.writeback import WriteBack

__all__ = ["LEVELS", "ChunkCorrupt", "ChunkNotFound", "NebulaTier", "PhotonRouter", "Policy",
           "RemoteWriteError", "WriteBack", "confined_paths", "from_host", "meminfo"]
