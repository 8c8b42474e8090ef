"""How many of a VM disk's chunks other disks of the same store hold too.

This is the ``shared_chunks`` figure of the device's metrics (Volt writes it into
its metrics lines): chunks are stored once, so every chunk the VM's disk shares
with another volume, a clone's base or another image's VM disk costs the store
nothing extra. Counted over the effective chunk sets (a DeltaVol's own chunks over
its base's), not reference counts, so a chunk a volume lists twice is not "shared".
Reads only manifests (so writes count once flushed); called from the VMM's I/O thread.
"""

from __future__ import annotations

from stellarium_core.errors import StellarError
from stellarium_core.volumes.imagedisk import ImageDisks
from stellarium_core.volumes.volume import Volume, VolumeStore


def volume_chunks(vol: Volume) -> set[bytes]:
    """The chunks ``vol`` reads from: its own slots over its base's."""
    return set(vol.chunk_slots().values())


def shared(mine: set[bytes], vols: VolumeStore, disks: ImageDisks, *,
           volume: str | None = None, image: bytes | None = None) -> dict[str, int]:
    """``{"chunks": n, "shared_chunks": m}`` for a disk holding ``mine`` (the volume named
    ``volume`` or the VM disk of ``image``, which are left out of the others)."""
    others: set[bytes] = set()
    for name in vols.names():
        if name == volume:
            continue
        try:
            with vols.open(name, readonly=True) as other:
                others |= volume_chunks(other)
        except StellarError:
            continue              # removed or damaged meanwhile: it shares nothing now
    for digest in disks.images():
        if digest == image:
            continue
        try:
            others |= disks.load(digest).digests()
        except StellarError:
            continue
    return {"chunks": len(mine), "shared_chunks": len(mine & others)}
