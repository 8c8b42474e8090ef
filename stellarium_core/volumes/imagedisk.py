"""Image disks: the VM form of an image, made of the image's own chunks.

A container image is a file-tree manifest whose file data is FastCDC chunks
and Cosmic Pack slots in NEBULA. Its VM form is a read-only EROFS disk
(:mod:`.erofs`) in which every file's bytes sit exactly where those chunks
already are, described by a TinyVol version-2 extent map: disk range ->
(chunk, offset inside the chunk, length), gaps read as zeros. Only the EROFS
metadata (inodes, directories, symlinks) is stored anew, in 64 KiB pieces.

On disk: ``<store>/volumes/images/<image manifest hex>.tinyvol``, one per image
content (so two names of one image share one disk, and a rebuilt image gets a
new one), plus a ``lock`` file.

Reference counting: a disk holds one NEBULA reference per distinct chunk it
reads from, taken before its manifest is written and released after it is
unlinked, so a crash can leak references but never free a chunk in use. An open
disk holds a shared ``flock`` on its manifest; :meth:`ImageDisks.remove` skips
a disk that is open (a running VM), so pruning never pulls chunks from under it.
"""

from __future__ import annotations

import bisect
import fcntl
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stellarium_core.fsutil import fsync_dir, write_atomic
from stellarium_core.hookspecs import Hasher
from stellarium_core.nebula import cosmic
from stellarium_core.nebula.errors import ChunkError
from stellarium_core.volumes import erofs
from stellarium_core.volumes.filetree import Entry, Manifest
from stellarium_core.volumes.tinyvol import Extent, ExtentMap, ManifestError, decode_extents
from stellarium_core.volumes.volume import ChunkReader, VolumeError

if TYPE_CHECKING:
    from stellarium_core.host import Host

SUFFIX = ".tinyvol"
META_PIECE = 64 * 1024
_ZEROS = memoryview(bytes(META_PIECE))


class ImageDisk:
    """A read-only disk over an extent map: byte-addressed reads, zero-copy where the
    chunk is stored uncompressed. Close it (or use it as a context manager)."""

    readonly = True

    def __init__(self, name: str, disk: ExtentMap, reader: ChunkReader, lock_fd: int) -> None:
        self.name = name
        self.disk = disk
        self._reader = reader
        self._fd = lock_fd
        self._starts = [x.offset for x in disk.extents]

    @property
    def size(self) -> int:
        return self.disk.size

    def _chunk(self, x: Extent) -> memoryview:
        view = self._reader.view(x.digest)  # PHOTON on a host: hashed and unpacked once
        if x.chunk_offset + x.length > len(view):
            raise ManifestError(f"image disk {self.name}: extent at {x.offset} reaches past "
                                f"the end of chunk {x.digest.hex()} ({len(view)} bytes)")
        return view

    def views(self, offset: int, length: int) -> Iterator[memoryview]:
        """The range as consecutive memoryviews: chunk slices and zeros for gaps."""
        if self._fd < 0:
            raise VolumeError(f"image disk {self.name} is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise VolumeError(f"range {offset}+{length} is outside image disk {self.name} "
                              f"of {self.size} bytes")
        extents, pos, end = self.disk.extents, offset, offset + length
        i = bisect.bisect_right(self._starts, pos) - 1
        if i < 0 or extents[i].end <= pos:
            i += 1
        while pos < end:
            if i < len(extents) and extents[i].offset <= pos:
                x = extents[i]
                n = min(x.end, end) - pos
                start = x.chunk_offset + pos - x.offset
                yield self._chunk(x)[start:start + n]
                i += 1
            else:
                gap = min(extents[i].offset if i < len(extents) else end, end) - pos
                n = min(gap, len(_ZEROS))
                yield _ZEROS[:n]
            pos += n

    def readinto(self, offset: int, buf: memoryview | bytearray) -> int:
        """Fill ``buf`` from ``offset``; one copy from the chunk mapping into ``buf``."""
        out = memoryview(buf).cast("B")
        pos = 0
        for view in self.views(offset, len(out)):
            out[pos:pos + len(view)] = view
            pos += len(view)
        return pos

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.readinto(offset, out)
        return bytes(out)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ImageDisk:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ImageDisks:
    """The image-disk catalog under ``<store>/volumes/images``, keyed by image digest."""

    def __init__(self, root: str | os.PathLike[str], store: Any, hasher: Hasher,
                 reader: ChunkReader | None = None) -> None:
        """Disks read their chunks through ``reader`` (default: the store itself)."""
        self.root = Path(root)
        self.store, self.hasher = store, hasher
        self.reader: ChunkReader = reader if reader is not None else store
        self.root.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_host(cls, host: Host) -> ImageDisks:
        """The catalog of ``host``'s store, read through the host's PHOTON router."""
        return cls(host.store_path / "volumes" / "images", host.store, host.hasher,
                   reader=host.photon)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / "lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def path(self, image: bytes) -> Path:
        return self.root / (image.hex() + SUFFIX)

    def has(self, image: bytes) -> bool:
        return self.path(image).exists()

    def images(self) -> list[bytes]:
        """Digests of the images that have a disk."""
        out = []
        for p in sorted(self.root.glob("*" + SUFFIX)):
            try:
                out.append(bytes.fromhex(p.name.removesuffix(SUFFIX)))
            except ValueError:
                continue
        return out

    def load(self, image: bytes) -> ExtentMap:
        """The extent map of ``image``'s disk, checked against the name it is filed under."""
        try:
            data = self.path(image).read_bytes()
        except FileNotFoundError:
            raise VolumeError(f"image {image.hex()} has no VM disk "
                              "(build it with `stellar image vmdisk`)") from None
        return self._decode(image, data)

    def _decode(self, image: bytes, data: bytes) -> ExtentMap:
        try:
            disk = decode_extents(data)
        except ManifestError as exc:
            raise ManifestError(f"image disk {self.path(image)}: {exc}") from None
        if disk.image != image:
            raise ManifestError(f"image disk {self.path(image)} was built for another image "
                                f"({disk.image.hex()})")
        return disk

    # -- building -------------------------------------------------------------------

    def ensure(self, image: bytes, tree: Callable[[], Manifest]) -> tuple[ExtentMap, bool]:
        """The disk of ``image``, built from its flattened tree (``tree()``, only called
        when the disk is missing); returns it and whether it was built now."""
        with self._locked():
            if self.has(image):
                return self.load(image), False
            return self._build(image, tree()), True

    def _pieces(self) -> Callable[[Entry], erofs.Pieces]:
        """``pieces(entry)`` for :func:`erofs.build`, checked against the store."""
        packs: dict[bytes, list[tuple[bytes, int, int]]] = {}
        sizes: dict[bytes, int] = {}

        def size(e: Entry, digest: bytes) -> int:
            if digest not in sizes:
                try:
                    sizes[digest] = self.store.size(digest)
                except ChunkError as exc:
                    raise erofs.ErofsError(f"entry {e.path!r}: {exc}") from None
            return sizes[digest]

        def pieces(e: Entry) -> erofs.Pieces:
            if e.pack is None:
                for digest, n in e.chunks:
                    if size(e, digest) != n:
                        raise erofs.ErofsError(f"entry {e.path!r}: chunk {digest.hex()} is "
                                               f"{size(e, digest)} bytes, the manifest says {n}")
                return [(digest, 0, n) for digest, n in e.chunks]
            if e.pack not in packs:
                try:
                    packs[e.pack] = cosmic.index(self.store.get(e.pack))
                except (ChunkError, ManifestError) as exc:
                    raise erofs.ErofsError(f"entry {e.path!r}: {exc}") from None
            rows = packs[e.pack]
            slot = e.slot if e.slot is not None else -1
            if not 0 <= slot < len(rows) or rows[slot][0] != e.hash or rows[slot][2] != e.size:
                raise erofs.ErofsError(f"entry {e.path!r}: Cosmic Pack {e.pack.hex()} slot "
                                       f"{e.slot} does not hold this file")
            _, off, n = rows[slot]
            return [(e.pack, off, n)]

        return pieces

    def _build(self, image: bytes, manifest: Manifest) -> ExtentMap:
        layout = erofs.build(manifest, self._pieces(), uuid=image[:16])
        disk = ExtentMap(size=layout.size, image=image, shift=erofs.BLOCK_BITS)
        meta = memoryview(layout.meta)
        put: set[bytes] = set()
        with self.store.batch() as batch:  # new metadata pieces: one ref each, one commit
            for off in range(0, len(meta), META_PIECE):
                piece = meta[off:off + META_PIECE]
                if piece == _ZEROS[:len(piece)]:
                    continue
                digest = self.hasher.digest(piece)
                if digest not in put:
                    batch.put(piece)
                    put.add(digest)
                disk.extents.append(Extent(off, digest, 0, len(piece)))
        disk.extents += [Extent(*x) for x in layout.extents]
        data = disk.encode()
        try:
            self.store.ref_many(dict.fromkeys(disk.digests() - put, 1))
        except BaseException:
            self.store.release_many(dict.fromkeys(put, 1))
            raise
        try:
            write_atomic(self.path(image), data)
        except BaseException:
            self.store.release_many(dict.fromkeys(disk.digests(), 1))
            raise
        return disk

    # -- using and removing -------------------------------------------------------------

    def open(self, image: bytes, name: str | None = None) -> ImageDisk:
        """Open ``image``'s disk for reading; it stays safe from :meth:`remove` until closed."""
        p = self.path(image)
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            raise VolumeError(f"image {image.hex()} has no VM disk "
                              "(build it with `stellar image vmdisk`)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.fstat(fd).st_nlink == 0:
                raise VolumeError(f"the VM disk of image {image.hex()} was removed meanwhile")
            with open(os.dup(fd), "rb") as fh:
                disk = self._decode(image, fh.read())
        except BaseException:
            os.close(fd)
            raise
        return ImageDisk(name or image.hex(), disk, self.reader, fd)

    def export_raw(self, image: bytes, dest: str | os.PathLike[str]) -> int:
        """Write the disk as a sparse raw image (e.g. to loop-mount); returns data bytes."""
        written = 0
        with self.open(image) as disk, open(dest, "wb") as fh:
            for x in disk.disk.extents:
                fh.seek(x.offset)
                fh.writelines(disk.views(x.offset, x.length))
                written += x.length
            fh.truncate(disk.size)
        return written

    def remove(self, image: bytes) -> bool:
        """Delete ``image``'s disk and release its chunks; False if it is open (in use)."""
        with self._locked():
            p = self.path(image)
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                return True
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
                with open(os.dup(fd), "rb") as fh:
                    disk = self._decode(image, fh.read())
                p.unlink()
                fsync_dir(self.root)  # the unlink must be durable before chunks are released
            finally:
                os.close(fd)
        self.store.release_many(dict.fromkeys(disk.digests(), 1))
        return True

    def prune(self, keep: Iterable[bytes]) -> tuple[list[bytes], list[bytes]]:
        """Remove the disks of images not in ``keep``; (removed, skipped as in use)."""
        keep = set(keep)
        removed, busy = [], []
        for image in self.images():
            if image not in keep:
                (removed if self.remove(image) else busy).append(image)
        return removed, busy

    def chunks(self) -> dict[bytes, set[bytes]]:
        """image digest -> the chunks its disk holds."""
        return {image: self.load(image).digests() for image in self.images()}
