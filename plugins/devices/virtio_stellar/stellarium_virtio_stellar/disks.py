"""What the virtio-blk request logic needs from a disk, and the raw-file disk.

:class:`VirtioStellar` serves any :class:`Disk`: the Stellarium volume view
(:class:`stellarium_core.volumes.blockdev.BlockDevice`, which satisfies the
protocol as it is) or :class:`RawFileDisk`, a plain image file or block device.
Both are addressed in 512-byte sectors; range checks happen in the device.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from stellarium_core.errors import StellarError
from stellarium_core.volumes.blockdev import SECTOR

#: Reads hand out views of at most this many bytes, so a 32 MiB request does not
#: allocate 32 MiB at once.
READ_PIECE = 1 << 20

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


@runtime_checkable
class Disk(Protocol):
    """A sector-addressed disk behind a virtio-blk device."""

    @property
    def sectors(self) -> int: ...

    @property
    def readonly(self) -> bool: ...

    def read_views(self, sector: int, count: int) -> Iterator[memoryview]: ...

    def write(self, sector: int, data: bytes | bytearray | memoryview) -> int: ...

    def flush(self) -> None: ...

    def discard(self, sector: int, count: int) -> None: ...

    def write_zeroes(self, sector: int, count: int) -> None: ...


class DiskError(StellarError):
    """A raw disk file cannot be used as asked (missing, odd size, locked)."""


class RawFileDisk:
    """A raw image file (or block device): pread/pwrite, fdatasync, punched holes.

    A writable disk takes an exclusive ``flock`` on the file, a read-only one a
    shared lock, so two VMs never write one image at the same time.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = Path(path)
        self._readonly = readonly
        try:
            fd = os.open(self.path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            raise DiskError(f"cannot open disk {self.path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                size = st.st_size
            elif stat.S_ISBLK(st.st_mode):
                size = os.lseek(fd, 0, os.SEEK_END)
            else:
                raise DiskError(f"disk {self.path} is not a regular file or block device")
            if size % SECTOR or size == 0:
                raise DiskError(f"disk {self.path} is {size} bytes, not a positive whole "
                                f"number of {SECTOR}-byte sectors")
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DiskError(f"disk {self.path} is in use by another VM "
                                "(its file lock is held)") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self._sectors = size // SECTOR

    @property
    def sectors(self) -> int:
        return self._sectors

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise DiskError(f"disk {self.path} is closed")
        return self._fd

    def read_views(self, sector: int, count: int) -> Iterator[memoryview]:
        off, left = sector * SECTOR, count * SECTOR
        while left:
            data = os.pread(self.fd, min(left, READ_PIECE), off)
            if not data:
                raise DiskError(f"disk {self.path} ended early at byte {off}")
            yield memoryview(data)
            off += len(data)
            left -= len(data)

    def write(self, sector: int, data: bytes | bytearray | memoryview) -> int:
        if len(data) % SECTOR:
            raise DiskError(f"write of {len(data)} bytes is not whole sectors")
        view, off = memoryview(data), sector * SECTOR
        while view:
            n = os.pwrite(self.fd, view, off)
            view, off = view[n:], off + n
        return len(data)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, sector: int, count: int) -> None:
        """Punch a hole; where the filesystem cannot, the hint is ignored (virtio allows it)."""
        try:
            self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, sector, count)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def write_zeroes(self, sector: int, count: int) -> None:
        """Zero a range without writing zeros where the filesystem can (punch or zero-range)."""
        for mode in (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE):
            try:
                self._fallocate(mode, sector, count)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        zeros = bytes(min(count * SECTOR, READ_PIECE))
        off, end = sector * SECTOR, (sector + count) * SECTOR
        while off < end:
            off += os.pwrite(self.fd, zeros[:end - off], off)

    def _fallocate(self, mode: int, sector: int, count: int) -> None:
        if count and _libc.fallocate(self.fd, mode, sector * SECTOR, count * SECTOR) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(self.path))

    def close(self) -> None:
        """Flush (when writable) and release the file and its lock."""
        if self._fd is None:
            return
        try:
            if not self._readonly:
                os.fdatasync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None
