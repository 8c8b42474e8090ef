"""The sector view of a volume, as the virtio-stellar block device uses it.

Everything is addressed in 512-byte sectors, like virtio-blk requests. Reads can
hand out memoryviews straight over the chunks (``read_views``): the host-wide hot
tier's shared pages, or NEBULA's pack mappings, so a device copies once, from the
shared chunk into guest memory. The disk is a
writable :class:`Volume` or a read-only :class:`ImageDisk` (an image's VM form).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from stellarium_core.volumes.volume import Volume, VolumeError

if TYPE_CHECKING:  # a volume's device does not import the image-disk machinery
    from stellarium_core.volumes.imagedisk import ImageDisk

SECTOR = 512


class BlockDevice:
    """Sector-addressed read, write, flush, discard and write-zeroes over a volume
    (reads only over an image disk)."""

    def __init__(self, volume: Volume | ImageDisk) -> None:
        if volume.size % SECTOR:
            raise VolumeError(f"volume {volume.name} is {volume.size} bytes, "
                              f"not a whole number of {SECTOR}-byte sectors")
        self.volume = volume

    @property
    def sectors(self) -> int:
        return self.volume.size // SECTOR

    @property
    def readonly(self) -> bool:
        return self.volume.readonly

    def read(self, sector: int, count: int) -> bytes:
        return self.volume.read(sector * SECTOR, count * SECTOR)

    def readinto(self, sector: int, buf: memoryview | bytearray) -> int:
        """Fill ``buf`` (a whole number of sectors) starting at ``sector``."""
        if len(buf) % SECTOR:
            raise VolumeError(f"read buffer of {len(buf)} bytes is not whole sectors")
        return self.volume.readinto(sector * SECTOR, buf)

    def read_views(self, sector: int, count: int) -> Iterator[memoryview]:
        """Zero-copy views covering the sectors (over the chunk mmap where possible)."""
        return self.volume.views(sector * SECTOR, count * SECTOR)

    def _writable(self) -> Volume:
        if not isinstance(self.volume, Volume) or self.volume.readonly:
            raise VolumeError(f"{self.volume.name} is read-only")
        return self.volume

    def write(self, sector: int, data: bytes | bytearray | memoryview) -> int:
        if len(data) % SECTOR:
            raise VolumeError(f"write of {len(data)} bytes is not whole sectors")
        return self._writable().write(sector * SECTOR, data)

    def flush(self) -> None:
        if not self.readonly:
            self._writable().flush()

    def discard(self, sector: int, count: int) -> None:
        self._writable().discard(sector * SECTOR, count * SECTOR)

    def write_zeroes(self, sector: int, count: int) -> None:
        self._writable().write_zeroes(sector * SECTOR, count * SECTOR)
