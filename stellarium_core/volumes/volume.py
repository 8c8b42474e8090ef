"""Volumes: a writable DeltaVol over an optional read-only ShareVol base.

A volume is a TinyVol manifest under ``<store>/volumes/<name>.tinyvol``; its
data lives in NEBULA. A ShareVol is a flat, read-only manifest stored under
``<store>/volumes/bases/<digest>.tinyvol`` and named by the digest of its bytes,
so any number of volumes share it by putting that digest in their header.

Reference counting: every manifest (volume or base) holds one NEBULA reference
per chunk it lists. Clone and snapshot add a reference per listed chunk (never
copy data); delete releases them. A base file is dropped, and its references
released, when the last volume naming it goes away. References are always added
before the manifest that needs them is written and released only after the
manifest that stopped needing them is on disk, so a crash can leak a reference
(reclaimable) but never free a chunk that is still listed.

Writes go through a bounded write-back cache of whole grid slots; ``flush``
stores them and persists the manifest atomically (tmp + fsync + rename).
Chunks are content addressed, so a write never changes a shared chunk: it
stores a new one and repoints this volume's slot (copy-on-write).
"""

from __future__ import annotations

import fcntl
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from stellarium_core.errors import StellarError, UsageError
from stellarium_core.fsutil import claim, fsync_dir, sweep_unclaimed, write_atomic
from stellarium_core.hookspecs import Hasher
from stellarium_core.volumes import tinyvol
from stellarium_core.volumes.tinyvol import NO_BASE, REF_ZERO, ChunkRef, ManifestError, TinyVol

if TYPE_CHECKING:
    from stellarium_core.host import Host

SUFFIX = ".tinyvol"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ZEROS = bytes(1 << 16)
_ZERO_VIEW = memoryview(_ZEROS)


class ChunkReader(Protocol):
    """Where volumes read chunks: a ChunkStore, or the PHOTON router above it."""

    def view(self, digest: bytes) -> memoryview: ...


class VolumeError(StellarError):
    """A volume operation was refused or failed; nothing was changed."""


def check_name(name: str) -> str:
    """``name`` if it is safe as a file name in the volumes dir, else a UsageError."""
    if not _NAME.fullmatch(name) or name.endswith(SUFFIX):
        raise UsageError(f"bad volume name {name!r}: use letters, digits, '.', '_', '-' "
                         "(max 128, not starting with '.' or '-')")
    return name


def _is_zero(buf: bytes | bytearray | memoryview) -> bool:
    n = len(buf)
    return buf == _ZEROS[:n] if n <= len(_ZEROS) else not any(buf)



@dataclass(frozen=True)
class ShareVol:
    """A read-only, flat base manifest shared by many volumes, named by its digest."""

    digest: bytes
    manifest: TinyVol

    def ref(self, idx: int) -> ChunkRef | None:
        return self.manifest.refs.get(idx)


class Volume:
    """A DeltaVol: byte-addressed reads and copy-on-write writes over an optional base.

    Obtain one from :meth:`VolumeStore.open` or :meth:`VolumeStore.create`; use it
    as a context manager (or call :meth:`close`) so unflushed writes are kept.
    """

    def __init__(self, catalog: VolumeStore, name: str, manifest: TinyVol,
                 base: ShareVol | None, *, readonly: bool, cache_slots: int = 256,
                 lock_fd: int | None = None) -> None:
        self._cat = catalog
        self._lock_fd = lock_fd
        self._store = catalog.store
        self.name = name
        self.manifest = manifest
        self.base = base
        self.readonly = readonly or manifest.readonly
        #: Unflushed slots: a bytearray (partly written), bytes or a view of bytes.
        self._dirty: dict[int, bytearray | bytes | memoryview] = {}
        self._release: list[bytes] = []
        self._changed = False
        self._cache_slots = cache_slots
        self._closed = False

    # -- geometry -----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.manifest.size

    @property
    def chunk_size(self) -> int:
        return self.manifest.chunk_size

    def _check_range(self, offset: int, length: int) -> None:
        if self._closed:
            raise VolumeError(f"volume {self.name} is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise VolumeError(f"range {offset}+{length} is outside volume {self.name} "
                              f"of {self.size} bytes")

    def _check_writable(self) -> None:
        if self.readonly:
            raise VolumeError(f"volume {self.name} is read-only (a snapshot or ShareVol)")

    def _spans(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(slot, start in slot, count, position in the caller's buffer) per slot touched."""
        shift, cs = self.manifest.shift, self.chunk_size
        pos = 0
        while pos < length:
            off = offset + pos
            idx, start = off >> shift, off & (cs - 1)
            n = min(cs - start, length - pos)
            yield idx, start, n, pos
            pos += n

    # -- reads --------------------------------------------------------------------

    def _current(self, idx: int) -> ChunkRef | None:
        """The effective ChunkRef of a flushed slot (None = zeros)."""
        ref = self.manifest.refs.get(idx)
        if ref is None and self.base is not None:
            ref = self.base.ref(idx)
        return None if ref is None or ref.zero else ref

    def chunk_slots(self) -> dict[int, bytes]:
        """Slot -> chunk of every flushed slot that holds one (its own over its base's);
        the slots left out read as zeros."""
        refs = dict(self.base.manifest.refs) if self.base is not None else {}
        refs.update(self.manifest.refs)
        return {i: r.digest for i, r in sorted(refs.items()) if not r.zero}

    def slot_view(self, idx: int) -> memoryview:
        """The slot's bytes through the catalog's reader (PHOTON on a host): zero-copy
        from the hot tier's shared pages, or from NEBULA for an uncompressed chunk."""
        buf = self._dirty.get(idx)
        if buf is not None:
            return memoryview(buf)
        ref = self._current(idx)
        n = self.manifest.slot_len(idx)
        if ref is None:
            return _ZERO_VIEW[:n]
        view = self._cat.reader.view(ref.digest)
        return view if len(view) == n else memoryview(bytes(view[:n]).ljust(n, b"\0"))

    def stable_slot(self, idx: int) -> memoryview | None:
        """The slot's bytes when they stay as they are until this volume writes the slot
        again (a flushed chunk, verified as it is read, or zeros), for a reader that keeps
        the view; None while the slot has unflushed writes (their buffer changes)."""
        if idx in self._dirty:
            return None
        self._check_range(idx << self.manifest.shift, self.manifest.slot_len(idx))
        return self.slot_view(idx)

    def views(self, offset: int, length: int) -> Iterator[memoryview]:
        """The range as consecutive memoryviews, for scatter-gather without copying.

        Views of flushed data stay valid; a view of a slot with unflushed writes
        shows later writes to that slot, so consume views before writing again.
        """
        self._check_range(offset, length)
        for idx, start, n, _ in self._spans(offset, length):
            yield self.slot_view(idx)[start:start + n]

    def readinto(self, offset: int, buf: memoryview | bytearray) -> int:
        """Fill ``buf`` from ``offset``; one copy from the chunk mapping into ``buf``."""
        out = memoryview(buf).cast("B")
        self._check_range(offset, len(out))
        for idx, start, n, pos in self._spans(offset, len(out)):
            out[pos:pos + n] = self.slot_view(idx)[start:start + n]
        return len(out)

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.readinto(offset, out)
        return bytes(out)

    # -- writes -------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at ``offset`` (any alignment); visible to reads at once.

        Whole slots of an immutable ``bytes`` are kept as views of it (no copy); any
        other buffer (guest memory) is copied once, since it may change afterwards."""
        src = memoryview(data).cast("B")
        owned = isinstance(data, bytes)
        self._check_range(offset, len(src))
        self._check_writable()
        for idx, start, n, pos in self._spans(offset, len(src)):
            if start == 0 and n == self.manifest.slot_len(idx):
                self._dirty[idx] = src[pos:pos + n] if owned else bytes(src[pos:pos + n])
                continue
            buf = self._dirty.get(idx)
            if not isinstance(buf, bytearray):
                buf = bytearray(self.slot_view(idx))
                self._dirty[idx] = buf
            buf[start:start + n] = src[pos:pos + n]
        self._changed = True
        if len(self._dirty) > self._cache_slots:
            self._spill()
        return len(src)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros; whole slots become holes (no chunk stored)."""
        self._check_range(offset, length)
        self._check_writable()
        for idx, start, n, _ in self._spans(offset, length):
            if n == self.manifest.slot_len(idx):
                self._dirty.pop(idx, None)
                self._set_slot(idx, None)
            else:
                self.write((idx << self.manifest.shift) + start, _ZERO_VIEW[:n])
        self._changed = True

    discard = write_zeroes

    def _set_slot(self, idx: int, digest: bytes | None) -> None:
        """Point slot ``idx`` at ``digest`` (already referenced once for us) or at zeros."""
        old = self.manifest.refs.get(idx)
        base = self.base.ref(idx) if self.base is not None else None
        if digest is None:
            new = ChunkRef(NO_BASE, self.manifest.slot_len(idx), REF_ZERO) if base else None
        elif base is not None and base.digest == digest:
            self._release.append(digest)  # same as the base: no delta entry needed
            new = None
        else:
            new = ChunkRef(digest, self.manifest.slot_len(idx))
        if new is None:
            self.manifest.refs.pop(idx, None)
        else:
            self.manifest.refs[idx] = new
        if old is not None and not old.zero:
            self._release.append(old.digest)

    def _spill(self) -> None:
        """Store every dirty slot in NEBULA; the manifest is not yet persisted."""
        # One durable commit for all slots; slots are repointed only once it succeeded
        # (a failed batch rolls back, leaving the dirty slots to retry).
        with self._store.batch() as batch:
            placed = [(idx, None if _is_zero(buf) else batch.put(buf))
                      for idx, buf in sorted(self._dirty.items())]
        for idx, digest in placed:
            self._set_slot(idx, digest)
        self._dirty.clear()

    def flush(self) -> None:
        """Make every write so far durable: chunks first, then the manifest, then releases."""
        if self._closed or self.readonly or not self._changed:
            return
        self._spill()
        self._cat._write_manifest(self.name, self.manifest)
        _refs(self._store, self._release, release=True)
        self._release.clear()
        self._changed = False

    def close(self) -> None:
        if not self._closed:
            try:
                self.flush()
            finally:
                self._closed = True
                if self._lock_fd is not None:
                    os.close(self._lock_fd)

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _refs(store: Any, digests: Iterable[bytes], release: bool = False) -> None:
    """Add (or drop) one reference per listed digest, in one durable store commit."""
    (store.release_many if release else store.ref_many)(Counter(digests))


def _listed(m: TinyVol) -> Iterator[bytes]:
    """The chunks a manifest holds references on (ZERO entries hold none)."""
    return (r.digest for r in m.refs.values() if not r.zero)


class VolumeStore:
    """The named-volume catalog under ``<store>/volumes`` over one NEBULA ChunkStore."""

    def __init__(self, root: Path, store: Any, hasher: Hasher, *, durable: bool = True,
                 cache_slots: int = 1024, reader: ChunkReader | None = None) -> None:
        """``durable=False`` skips the fsyncs when a new manifest is created (create,
        clone, snapshot): a crash may then lose the new volume and leak its chunk
        references, never free a chunk still listed. ``cache_slots`` bounds each open
        volume's write-back cache (1024 x 64 KiB = 64 MiB). Reads go through
        ``reader`` (default: the store itself)."""
        self.reader: ChunkReader = reader if reader is not None else store
        self.root = Path(root)
        self.durable = durable
        self.cache_slots = cache_slots
        self.bases = self.root / "bases"
        self.store = store
        self.hasher = hasher
        self.bases.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_host(cls, host: Host) -> VolumeStore:
        """The catalog of ``host``'s store, read through the host's PHOTON router."""
        return cls(host.store_path / "volumes", host.store, host.hasher, reader=host.photon)

    # -- files --------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.root / (check_name(name) + SUFFIX)

    def _read_manifest(self, name: str) -> TinyVol:
        p = self.path(name)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise VolumeError(f"no volume named {name!r}") from None
        try:
            return tinyvol.decode(data)
        except ManifestError as exc:
            raise ManifestError(f"volume {name}: {exc}") from None

    def _write_manifest(self, name: str, vol: TinyVol, *, new: bool = False) -> None:
        # Rewrites are always fsync'd: releases that follow must never outlive them.
        try:
            write_atomic(self.path(name), tinyvol.encode(vol), exclusive=new,
                         durable=self.durable or not new)
        except FileExistsError:
            raise VolumeError(f"volume {name!r} already exists") from None

    def _lock(self, name: str) -> int:
        """An exclusive writer lock on ``name``, so two writers never race on refcounts."""
        fd = os.open(self.root / f".{check_name(name)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VolumeError(f"volume {name} is open for writing elsewhere") from None
        return fd

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def names(self) -> list[str]:
        return sorted(p.name[:-len(SUFFIX)] for p in self.root.glob("*" + SUFFIX)
                      if not p.name.startswith("."))

    def _base_path(self, digest: bytes) -> Path:
        return self.bases / (digest.hex() + SUFFIX)

    def load_base(self, digest: bytes) -> ShareVol:
        """The ShareVol named ``digest``; checks the file against its name."""
        p = self._base_path(digest)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise VolumeError(f"base volume {digest.hex()} is missing from {self.bases}") from None
        if self.hasher.digest(data) != digest:
            raise ManifestError(f"base volume {digest.hex()} does not match its digest (corrupt)")
        return ShareVol(digest, tinyvol.decode(data))

    def _base_users(self, digest: bytes) -> int:
        n = 0
        for name in self.names():
            with open(self.path(name), "rb") as fh:
                if tinyvol.decode_header(fh.read(64)).base == digest:
                    n += 1
        return n

    def _drop_base_if_unused(self, digest: bytes) -> None:
        if digest == NO_BASE or self._base_users(digest):
            return
        p = self._base_path(digest)
        try:
            base = self.load_base(digest)
        except VolumeError:
            return
        p.unlink()
        fsync_dir(self.bases)
        _refs(self.store, _listed(base.manifest), release=True)

    # -- operations ---------------------------------------------------------------

    def open(self, name: str, *, readonly: bool = False) -> Volume:
        """Open ``name``; a writable open holds the volume's writer lock until close."""
        m = self._read_manifest(name)
        base = self.load_base(m.base) if m.base != NO_BASE else None
        if base is not None and (base.manifest.size != m.size or base.manifest.shift != m.shift):
            raise ManifestError(f"volume {name}: base {m.base.hex()} has a different geometry")
        if readonly or m.readonly:
            return Volume(self, name, m, base, readonly=True)
        fd = self._lock(name)
        m = self._read_manifest(name)  # the holder before us may have flushed meanwhile
        return Volume(self, name, m, base, readonly=False, cache_slots=self.cache_slots,
                      lock_fd=fd)

    def create(self, name: str, size: int | None = None, *, shift: int = tinyvol.DEFAULT_SHIFT,
               base: bytes | None = None) -> Volume:
        """A new volume: ``size`` bytes of zeros, or an empty delta over the ShareVol
        ``base`` (its size and grid). Either way a 64-byte manifest, no data."""
        if base is not None:
            b = self.load_base(base).manifest
            m = TinyVol(size=b.size, shift=b.shift, base=base)
        elif size is None:
            raise UsageError("a new volume needs a size or a base")
        else:
            m = TinyVol(size=size, shift=shift)
        self._write_manifest(name, m, new=True)
        return self.open(name)

    def import_base(self, name: str, data: bytes) -> Volume:
        """A new volume ``name`` over a ShareVol manifest from elsewhere (e.g. fetched
        by digest from a CDN, with its chunks already put into NEBULA).

        ``data`` must be a flat, read-only TinyVol whose chunks are all in the store;
        the installed base holds one reference per listed chunk and goes away with
        its last volume, like any base.
        """
        check_name(name)
        if self.exists(name):
            raise VolumeError(f"volume {name!r} already exists")
        digest = self._install_base(data)
        try:
            return self.create(name, base=digest)
        except BaseException:
            self._drop_base_if_unused(digest)
            raise

    def _install_base(self, data: bytes) -> bytes:
        """Install a ShareVol manifest (unless this store has it); its digest."""
        m = tinyvol.decode(data)
        if m.base != NO_BASE or not m.readonly:
            raise ManifestError("a ShareVol base must be flat and read-only")
        digest = self.hasher.digest(data)
        p = self._base_path(digest)
        if not p.exists():
            self._check_present(m, f"base {digest.hex()}")
            _refs(self.store, _listed(m))
            try:
                write_atomic(p, data)
            except BaseException:
                _refs(self.store, _listed(m), release=True)
                raise
        return digest

    def _check_present(self, m: TinyVol, what: str) -> None:
        missing = self.store.missing(set(_listed(m)))
        if missing:
            raise VolumeError(f"{what} lists {len(missing)} chunks that are not in the store "
                              f"(first: {missing[0].hex()})")

    def import_volume(self, name: str, data: bytes, base: bytes = b"") -> None:
        """A new read-only volume ``name`` from a TinyVol manifest made elsewhere (a
        migrated VM's disk), over the ShareVol manifest ``base`` it names (installed if
        this store lacks it). Every chunk either lists must be in the store already."""
        check_name(name)
        m = tinyvol.decode(data)          # version 1 only: an image's disk is not a volume
        if (m.base != NO_BASE) != bool(base) or (base and self.hasher.digest(base) != m.base):
            raise ManifestError(f"volume {name}: the base given is not the one it names")
        if base:
            self._install_base(base)
        self._check_present(m, f"volume {name}")
        _refs(self.store, _listed(m))
        m.readonly = True
        try:
            self._write_manifest(name, m, new=True)
        except BaseException:
            _refs(self.store, _listed(m), release=True)
            self._drop_base_if_unused(m.base)
            raise

    def manifest_bytes(self, name: str) -> tuple[bytes, bytes]:
        """(the volume's flushed manifest, its base's manifest or b""): what moves it."""
        data = self.path(name).read_bytes()
        m = tinyvol.decode(data)
        return data, (self._base_path(m.base).read_bytes() if m.base != NO_BASE else b"")

    def import_raw(self, name: str, src: str | os.PathLike[str] | BinaryIO,
                   *, shift: int = tinyvol.DEFAULT_SHIFT, mappable: bool = False) -> Volume:
        """A new volume holding a raw disk image; all-zero slots are not stored.
        ``mappable``: its chunks are stored so they can be mapped (a DAX base).

        The references taken are journaled until the manifest holds them, so a
        killed import leaks nothing ``gc`` cannot release.
        """
        check_name(name)
        if self.exists(name):
            raise VolumeError(f"volume {name!r} already exists")
        fh = open(src, "rb") if isinstance(src, (str, os.PathLike)) else src
        err: BaseException | None = None
        with self.store.pending() as journal:
            try:
                m = TinyVol(size=os.fstat(fh.fileno()).st_size, shift=shift)
                # one durable commit per 64 MiB, not per chunk
                with self.store.batch(journal=journal) as batch:
                    for idx in range(m.slots):
                        want = m.slot_len(idx)
                        data = fh.read(want)
                        if len(data) != want:
                            err = VolumeError(f"image shrank while importing "
                                              f"(slot {idx}: {len(data)} of {want} bytes)")
                            break
                        if not _is_zero(data):
                            m.refs[idx] = ChunkRef(batch.put(data, mappable), want)
            finally:
                if fh is not src:
                    fh.close()
            journal.settle()  # the manifest takes the references over (or they go back)
        if err is None:
            try:
                self._write_manifest(name, m, new=True)
                return self.open(name)
            except BaseException as exc:
                err = exc
        _refs(self.store, _listed(m), release=True)
        raise err

    def export_raw(self, name: str, dest: str | os.PathLike[str]) -> int:
        """Write the volume as a sparse raw image; returns the bytes of data written.

        The image appears at ``dest`` only when complete (written under a claimed
        temporary name, then renamed); one a killed export left is swept by the next.
        """
        dest = Path(dest)
        if not dest.parent.is_dir():
            raise VolumeError(f"{dest}: No such file or directory ({dest.parent} is not a "
                              "directory)")
        if dest.exists() and not dest.is_file():
            raise UsageError(f"{dest} exists and is not a regular file")
        prefix = f".{dest.name}.export-"
        sweep_unclaimed(dest.parent, prefix)
        tmp, fd = claim(dest.parent, prefix, directory=False)
        written = 0
        try:
            with self.open(name, readonly=True) as vol, open(fd, "wb", closefd=False) as fh:
                for idx in range(vol.manifest.slots):
                    if vol._current(idx) is None:
                        continue
                    fh.seek(idx << vol.manifest.shift)
                    fh.write(vol.slot_view(idx))
                    written += vol.manifest.slot_len(idx)
                fh.truncate(vol.size)
                fh.flush()
                os.fsync(fd)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return written

    def _copy(self, src: str, dst: str, readonly: bool) -> None:
        check_name(dst)
        m = self._read_manifest(src)
        if m.base != NO_BASE and not self._base_path(m.base).exists():
            raise VolumeError(f"base volume {m.base.hex()} is missing from {self.bases}")
        if self.exists(dst):
            raise VolumeError(f"volume {dst!r} already exists")
        _refs(self.store, _listed(m))
        m.readonly = readonly
        try:
            self._write_manifest(dst, m, new=True)
        except BaseException:
            _refs(self.store, _listed(m), release=True)
            raise

    def clone(self, src: str, dst: str) -> None:
        """A writable copy of ``src``'s flushed state: a manifest copy, no data."""
        self._copy(src, dst, readonly=False)

    def snapshot(self, src: str, dst: str) -> None:
        """A read-only copy of ``src``'s flushed state."""
        self._copy(src, dst, readonly=True)

    def commit(self, name: str) -> bytes:
        """Fold the volume's delta into a new ShareVol base; the volume then layers on it.

        Returns the new base digest. Other volumes on the old base are untouched.
        """
        with self.open(name) as vol:
            return self._commit(vol)

    def _commit(self, vol: Volume) -> bytes:
        vol._check_writable()
        name = vol.name
        m = vol.manifest
        old_base = m.base
        flat = TinyVol(size=m.size, shift=m.shift, readonly=True,
                       refs=tinyvol.merged(vol.base.manifest.refs if vol.base else {}, m.refs))
        data = tinyvol.encode(flat)
        digest = self.hasher.digest(data)
        p = self._base_path(digest)
        if not p.exists():
            _refs(self.store, _listed(flat))
            try:
                write_atomic(p, data)
            except BaseException:
                _refs(self.store, _listed(flat), release=True)
                raise
        self._write_manifest(name, TinyVol(size=m.size, shift=m.shift, base=digest))
        _refs(self.store, _listed(m), release=True)
        if old_base != digest:
            self._drop_base_if_unused(old_base)
        return digest

    def delete(self, name: str) -> None:
        """Remove the volume and release its chunks (and its base when last user)."""
        fd = self._lock(name)
        try:
            m = self._read_manifest(name)
            self.path(name).unlink()
            (self.root / f".{name}.lock").unlink()
            fsync_dir(self.root)  # the unlink must be durable before chunks are released
        finally:
            os.close(fd)
        _refs(self.store, _listed(m), release=True)
        self._drop_base_if_unused(m.base)

    def chunks(self) -> set[bytes]:
        """Every chunk a volume or a base of this catalog lists."""
        out: set[bytes] = set()
        for name in self.names():
            out.update(_listed(self._read_manifest(name)))
        for p in self.bases.glob("*" + SUFFIX):
            out.update(_listed(tinyvol.decode(p.read_bytes())))
        return out

    def info(self, name: str) -> dict[str, Any]:
        m = self._read_manifest(name)
        stored = [r for r in m.refs.values() if not r.zero]
        return {
            "name": name, "size": m.size, "chunk_size": m.chunk_size,
            "base": m.base.hex() if m.base != NO_BASE else None,
            "readonly": m.readonly, "entries": len(m.refs),
            "delta_bytes": sum(r.length for r in stored),
            "manifest_bytes": self.path(name).stat().st_size,
        }
