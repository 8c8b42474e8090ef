"""File-tree manifests: a directory tree (an image layer) as metadata + chunk lists.

Public API (what image layers and Voltainer build on)::

    m = capture(root, store, chunker, hasher)       -> Manifest (chunks put into NEBULA)
    capture(upper, ..., overlay_upper=True)         -> an overlayfs upper dir as an OCI layer
    digest = save(m, directory, hasher, store, held=True) -> digest; the file holds m's refs
    m = load(path_or_bytes)                         -> Manifest (ManifestError when damaged)
    restore(m, store, target, hasher)               -> byte- and metadata-identical tree
    for e in m: ...                                 -> Entry, parents before children
    merged = stack([lower, ..., upper])             -> Manifest with OCI whiteouts applied
    references(m)                                   -> Counter of the references capture took
    release(m, store)                               -> drop them (one durable commit)
    footprint(m, store)                             -> unique chunks, bytes, pack bytes
    diff_trees(a, b)                                -> [] when identical (content + lstat + xattrs)

The manifest is canonical JSON (sorted keys, no spaces), so equal trees give
equal bytes and digests. Each entry has path, type, mode, uid, gid, mtime_ns and
xattrs; files carry ``chunks`` ([[digest hex, length], ...], FastCDC via the
configured chunker) or, under 4 KiB, ``pack``/``slot``/``hash`` (a Cosmic Pack
slot and the file's own digest); symlinks and hardlinks carry ``target``;
device nodes carry ``rdev``. A hardlink's target is the first path of the inode
in walk order. Reference counting: one NEBULA reference per chunk per file
entry, plus one per pack; :func:`release` gives them back.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import stat
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stellarium_core.confined import ConfinedDir
from stellarium_core.errors import StellarError
from stellarium_core.fsutil import claim, remove_tree, sweep_unclaimed, write_atomic
from stellarium_core.hookspecs import Chunker, Hasher
from stellarium_core.nebula import cosmic, packs
from stellarium_core.nebula.pending import RefJournal
from stellarium_core.nebula.table import MAX_LEN
from stellarium_core.volumes.tinyvol import ManifestError

FORMAT = "stellarium-tree"
VERSION = 1
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_OVL = "trusted.overlay."
_OVL_OPAQUE = _OVL + "opaque"

_TYPES = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink",
          stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
          stat.S_IFSOCK: "socket"}
#: Entry type -> the S_IFMT bits of its inode (for mknod on restore, and views of the tree).
TYPE_BITS = {v: k for k, v in _TYPES.items()}
_KINDS = set(_TYPES.values()) | {"hardlink"}
_ID_MAX = (1 << 32) - 2          # uid/gid -1 means "unchanged" to chown
_INT64_MAX = (1 << 63) - 1
_DEV_MAX = (1 << 64) - 1


@dataclass
class Entry:
    """One path of the tree; ``path`` is relative and '/'-separated, '.' is the root."""

    path: str
    type: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    xattrs: dict[str, bytes] = field(default_factory=dict)
    size: int = 0
    chunks: list[tuple[bytes, int]] = field(default_factory=list)
    pack: bytes | None = None
    slot: int | None = None
    hash: bytes | None = None
    target: str | None = None
    rdev: int | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "type": self.type, "mode": self.mode,
                             "uid": self.uid, "gid": self.gid, "mtime_ns": self.mtime_ns}
        if self.xattrs:
            d["xattrs"] = {k: base64.b64encode(v).decode() for k, v in self.xattrs.items()}
        if self.type == "file":
            d["size"] = self.size
            if self.pack is not None:
                d.update(pack=self.pack.hex(), slot=self.slot, hash=self.hash.hex())
            elif self.chunks:
                d["chunks"] = [[dg.hex(), n] for dg, n in self.chunks]
        if self.target is not None:
            d["target"] = self.target
        if self.rdev is not None:
            d["rdev"] = self.rdev
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Entry:
        try:
            e = cls(path=d["path"], type=d["type"], mode=int(d["mode"]), uid=int(d["uid"]),
                    gid=int(d["gid"]), mtime_ns=int(d["mtime_ns"]),
                    xattrs={k: base64.b64decode(v) for k, v in d.get("xattrs", {}).items()},
                    size=int(d.get("size", 0)),
                    chunks=[(bytes.fromhex(h), int(n)) for h, n in d.get("chunks", [])],
                    pack=bytes.fromhex(d["pack"]) if "pack" in d else None,
                    slot=d.get("slot"), hash=bytes.fromhex(d["hash"]) if "hash" in d else None,
                    target=d.get("target"), rdev=d.get("rdev"))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise ManifestError(f"bad tree manifest entry {d!r:.120}: {exc!r}") from None
        _check_entry(e)
        return e


def _check_entry(e: Entry) -> None:
    # A manifest may come from an untrusted server: wrong JSON types are a ManifestError.
    if (not isinstance(e.path, str) or not isinstance(e.type, str)
            or not isinstance(e.target, str | None) or not isinstance(e.slot, int | None)
            or not isinstance(e.rdev, int | None)):
        raise ManifestError(f"tree manifest entry {e.path!r:.80} has a field of the wrong type")
    parts = e.path.split("/")
    if e.path != "." and (e.path.startswith("/") or any(p in ("", ".", "..") for p in parts)
                          or "\0" in e.path):
        raise ManifestError(f"unsafe path {e.path!r} in tree manifest")
    numbers = [("mode", e.mode, 0o7777), ("uid", e.uid, _ID_MAX), ("gid", e.gid, _ID_MAX),
               ("size", e.size, _INT64_MAX), ("slot", e.slot or 0, _ID_MAX),
               ("rdev", e.rdev or 0, _DEV_MAX)]
    numbers += [("chunk length", n, MAX_LEN) for _, n in e.chunks]
    for name, value, top in numbers:
        if not 0 <= value <= top:
            raise ManifestError(f"{e.path!r}: {name} {value} is outside 0..{top}")
    if not -_INT64_MAX <= e.mtime_ns <= _INT64_MAX:
        raise ManifestError(f"{e.path!r}: mtime_ns {e.mtime_ns} is out of range")
    if (e.target is not None and "\0" in e.target) or not all(
            isinstance(k, str) and k and "\0" not in k for k in e.xattrs):
        raise ManifestError(f"{e.path!r}: a link target or xattr name holds a NUL byte")
    if e.type not in _KINDS:
        raise ManifestError(f"unknown entry type {e.type!r} for {e.path!r}")
    if e.type in ("symlink", "hardlink") and e.target is None:
        raise ManifestError(f"{e.type} {e.path!r} has no target")
    if e.type == "hardlink" and (e.target == "." or e.target.startswith("/")
                                 or any(p in ("", ".", "..") for p in e.target.split("/"))):
        raise ManifestError(f"hardlink {e.path!r} has an unsafe target {e.target!r}")
    if e.type == "file" and e.pack is None and sum(n for _, n in e.chunks) != e.size:
        raise ManifestError(f"chunks of {e.path!r} do not add up to its size {e.size}")


def _sort_key(path: str) -> tuple[str, ...]:
    return () if path == "." else tuple(path.split("/"))


def canonical_json(doc: dict[str, Any]) -> bytes:
    """Sorted keys, no spaces: equal documents give equal bytes, hence equal digests."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def parse_json(data: bytes, what: str) -> Any:
    """JSON from an untrusted source; anything else (truncated, not JSON, nested
    deeper than the parser's stack) is a ManifestError naming ``what``."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{what} is truncated or corrupt: {exc}") from None
    except RecursionError:
        raise ManifestError(f"{what} is nested too deeply to be a manifest") from None


def parse_document(data: bytes, fmt: str, version: int, what: str) -> dict[str, Any]:
    """The JSON object in ``data`` if it is a ``fmt`` document of ``version``.

    Anything else (truncated, not JSON, another format or version) is a
    ManifestError naming ``what``, never a JSON or attribute error.
    """
    doc = parse_json(data, what)
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise ManifestError(f"not a Stellarium {what}")
    if doc.get("version") != version:
        raise ManifestError(f"{what} version {doc.get('version')} is not supported")
    return doc


@dataclass
class Manifest:
    """An ordered tree manifest; iterating yields entries parents-first."""

    entries: list[Entry]
    hasher: str = "blake3"

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def by_path(self) -> dict[str, Entry]:
        return {e.path: e for e in self.entries}

    def encode(self) -> bytes:
        return canonical_json({"format": FORMAT, "version": VERSION, "hasher": self.hasher,
                               "entries": [e.to_json() for e in self.entries]})

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        doc = parse_document(data, FORMAT, VERSION, "tree manifest")
        if not isinstance(doc.get("entries"), list):
            raise ManifestError("tree manifest has no entry list")
        return cls([Entry.from_json(d) for d in doc["entries"]], doc.get("hasher", "blake3"))

    def digest(self, hasher: Hasher) -> bytes:
        return hasher.digest(self.encode())


# -- capture ----------------------------------------------------------------------


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def _listing(path: str) -> Iterator[tuple[str, bool]]:
    with os.scandir(path) as it:
        return iter(sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it))


def _walk(root: str) -> Iterator[tuple[str, str]]:
    """(relative path, absolute path) parents-first, names in sorted order.

    Depth-first with an explicit stack, not recursion: a crafted tar nests
    directories thousands deep, past Python's recursion limit.
    """
    yield ".", root
    stack = [(".", root, _listing(root))]
    while stack:
        rel, path, names = stack[-1]
        for name, is_dir in names:
            child_rel = name if rel == "." else f"{rel}/{name}"
            child = os.path.join(path, name)
            yield child_rel, child
            if is_dir:
                stack.append((child_rel, child, _listing(child)))
                break  # its subtree first; this directory's listing resumes after it
        else:
            stack.pop()


def capture(root: str | os.PathLike[str], store: Any, chunker: Chunker, hasher: Hasher,
            *, cosmic_packs: bool = True, overlay_upper: bool = False,
            journal: RefJournal | None = None) -> Manifest:
    """Store the tree at ``root`` in NEBULA and return its manifest.

    Files under 4 KiB go into Cosmic Packs unless ``cosmic_packs`` is False, in
    which case every file is chunked alone. With ``overlay_upper`` the tree is an
    overlayfs upper directory (a container's writes) and its whiteouts become OCI
    ones: a 0/0 character device NAME becomes ``.wh.NAME``, and a directory marked
    ``trusted.overlay.opaque=y`` gets a ``.wh..wh..opq`` entry. The references
    taken are recorded in ``journal`` (if given) until the caller keeps them.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise StellarError(f"{root} is not a directory")
    inodes: dict[tuple[int, int], str] = {}
    entries: list[Entry] = []
    pending: list[tuple[Entry, cosmic.PackSlot]] = []
    with store.batch(journal=journal) as batch:  # one durable commit per 64 MiB
        packer = cosmic.Packer(batch, hasher)
        for rel, path in _walk(root):
            st = os.lstat(path)
            kind = _TYPES.get(stat.S_IFMT(st.st_mode))
            if kind is None:
                raise StellarError(f"{path}: unsupported file type {stat.S_IFMT(st.st_mode):#o}")
            e = Entry(rel, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
            if overlay_upper and kind == "char" and st.st_rdev == 0:
                # overlayfs may hardlink all whiteouts to one inode: check this first
                parent, _, name = rel.rpartition("/")
                e.path = (parent + "/" if parent else "") + WHITEOUT + name
                e.type, e.mode = "file", 0o644
                entries.append(e)
                continue
            if kind != "dir" and st.st_nlink > 1:
                first = inodes.setdefault((st.st_dev, st.st_ino), rel)
                if first != rel:
                    e.type, e.target = "hardlink", first
                    entries.append(e)
                    continue
            e.xattrs = _xattrs(path)
            opaque = overlay_upper and e.xattrs.get(_OVL_OPAQUE) == b"y"
            if overlay_upper:  # overlayfs bookkeeping, never visible in the merged view
                e.xattrs = {k: v for k, v in e.xattrs.items() if not k.startswith(_OVL)}
            if opaque:
                entries.append(e)
                inner = OPAQUE if rel == "." else f"{rel}/{OPAQUE}"
                entries.append(Entry(inner, "file", 0o644, e.uid, e.gid, e.mtime_ns))
                continue
            if kind == "file":
                e.size = st.st_size
                if cosmic_packs and 0 < st.st_size < cosmic.SMALL_FILE:
                    with open(path, "rb") as fh:
                        data = fh.read()
                    if len(data) != st.st_size:
                        raise StellarError(f"{path} changed size while being captured")
                    e.hash, ps = packer.add(data)
                    pending.append((e, ps))
                elif st.st_size:
                    e.chunks = batch.put_stream(path, chunker)
                    if sum(n for _, n in e.chunks) != st.st_size:
                        raise StellarError(f"{path} changed size while being captured")
            elif kind == "symlink":
                e.target = os.readlink(path)
            elif kind in ("char", "block"):
                e.rdev = st.st_rdev
            entries.append(e)
        packer.seal()
    for e, ps in pending:
        e.pack, e.slot = ps.pack, ps.slot
    if overlay_upper:  # renamed whiteouts must sit in walk order again
        entries.sort(key=lambda x: _sort_key(x.path))
    return Manifest(entries, hasher.name)


def references(manifest: Manifest) -> Counter[bytes]:
    """The NEBULA references :func:`capture` takes for ``manifest``: one per chunk
    per file entry, one per Cosmic Pack."""
    refs: Counter[bytes] = Counter()
    packs = set()
    for e in manifest:
        for digest, _ in e.chunks:
            refs[digest] += 1
        if e.pack is not None:
            packs.add(e.pack)
    refs.update(packs)
    return refs


def release(manifest: Manifest, store: Any) -> None:
    """Give back the NEBULA references :func:`capture` took for ``manifest`` (one fsync)."""
    store.release_many(references(manifest))


def footprint(manifest: Manifest, store: Any) -> dict[str, int]:
    """Unique chunks the manifest needs, their bytes, and what they take in NEBULA's
    packs (compressed, each with its record, aligned)."""
    sizes: dict[bytes, int] = {}
    for e in manifest:
        for digest, n in e.chunks:
            sizes[digest] = n
        if e.pack is not None and e.pack not in sizes:
            sizes[e.pack] = store.size(e.pack)
    return {"chunks": len(sizes), "bytes": sum(sizes.values()),
            "pack_bytes": sum(packs.footprint(store.entry(d)) for d in sizes)}


def save(manifest: Manifest, directory: str | os.PathLike[str], hasher: Hasher, store: Any,
         *, held: bool) -> bytes:
    """Keep ``<directory>/<digest>.json``, holding the manifest's references once.

    ``held``: the caller already holds one set (:func:`capture` took them), else
    they are taken here, before the file is written. A file already there holds
    its set (even when damaged: its references were taken when it was written),
    so a held set is given back, and a damaged file is rewritten with the
    right bytes. Returns the digest.
    """
    data = manifest.encode()
    digest = hasher.digest(data)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{digest.hex()}.json"
    try:
        present = path.read_bytes()
    except FileNotFoundError:
        if not held:
            store.ref_many(references(manifest))
        try:
            write_atomic(path, data, exclusive=True)
        except FileExistsError:  # kept by someone else meanwhile
            release(manifest, store)
        except BaseException:
            if not held:
                release(manifest, store)
            raise
        return digest
    if held:
        release(manifest, store)
    if present != data:
        write_atomic(path, data)
    return digest


def load(src: str | os.PathLike[str] | bytes, hasher: Hasher | None = None) -> Manifest:
    """Read a manifest from a file (or bytes); a file named by digest is checked against it."""
    if isinstance(src, bytes):
        return Manifest.decode(src)
    p = Path(src)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise StellarError(f"no tree manifest at {p}") from None
    m = Manifest.decode(data)
    name = p.name.removesuffix(".json")
    if hasher is not None and len(name) == 2 * hasher.digest_size:
        if hasher.digest(data).hex() != name:
            raise ManifestError(f"tree manifest {p} does not match its digest (corrupt)")
    return m


# -- restore ----------------------------------------------------------------------


class _PackCache:
    """Keeps the last pack read, since a directory's small files share packs."""

    def __init__(self, store: Any, hasher: Hasher) -> None:
        self.store, self.hasher = store, hasher
        self.digest, self.data = b"", b""

    def read(self, e: Entry) -> bytes:
        if self.digest != e.pack:
            self.data, self.digest = self.store.get(e.pack), e.pack
        assert e.slot is not None
        return cosmic.read_slot(self.data, e.slot, self.hasher, expect=e.hash)


def _check_tree(entries: list[Entry]) -> None:
    """A restorable tree: the root first, each path once, each under a directory
    listed before it, each hardlink to a non-directory listed before it."""
    if not entries or entries[0].path != "." or entries[0].type != "dir":
        raise ManifestError("tree manifest does not start with its root directory")
    kinds = {".": "dir"}
    for e in entries[1:]:
        if e.path in kinds:
            raise ManifestError(f"tree manifest lists {e.path!r} twice")
        parent = e.path.rpartition("/")[0] or "."
        if kinds.get(parent) != "dir":
            raise ManifestError(f"{e.path!r} is not under a directory listed before it")
        if e.type == "hardlink" and kinds.get(e.target or "", "dir") == "dir":
            raise ManifestError(f"hardlink {e.path!r} -> {e.target!r}: the target is not a "
                                "file listed before it")
        kinds[e.path] = e.type


def restore(manifest: Manifest, store: Any, target: str | os.PathLike[str],
            hasher: Hasher) -> None:
    """Recreate the tree at ``target`` (absent or empty), contents and metadata.

    Every chunk is read through NEBULA (verified), packed files against their own
    hash. Every path is created beneath ``target`` and never through a symlink
    (a manifest may come from a pull), and hardlinks must name a file inside it.
    Metadata is applied children-first, so directory mtimes survive. The tree
    appears at ``target`` only once complete.
    """
    target = os.path.abspath(target)
    # Built under a claimed name and moved into place when complete, so a failed
    # or killed restore never leaves a partial tree at the target: beside it and
    # renamed, or, when the target is a mount point, inside it and moved in.
    mounted = os.path.ismount(target)
    parent = target if mounted else os.path.dirname(target)
    prefix = ".restore-" if mounted else f".{os.path.basename(target)}.restore-"
    if os.path.isdir(parent):
        sweep_unclaimed(parent, prefix)
    if os.path.lexists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise StellarError(f"restore target {target} exists and is not an empty directory")
    if manifest.hasher != hasher.name:
        raise ManifestError(f"tree manifest was made with hasher {manifest.hasher!r}, "
                            f"this store uses {hasher.name!r}")
    entries = list(manifest)
    _check_tree(entries)
    os.makedirs(parent, exist_ok=True)
    work, fd = claim(parent, prefix, directory=True)
    try:
        _restore_into(entries, store, work, hasher)
        if not mounted:
            os.rename(work, target)
            return
        for name in os.listdir(work):
            os.rename(work / name, os.path.join(target, name))
        os.rmdir(work)
        root = entries[0]
        with ConfinedDir(target) as top:
            top.set_attrs(".", uid=root.uid, gid=root.gid, mode=root.mode,
                          mtime_ns=root.mtime_ns, xattrs=root.xattrs)
    except BaseException:
        remove_tree(work)
        raise
    finally:
        os.close(fd)


def _restore_into(entries: list[Entry], store: Any, target: Path, hasher: Hasher) -> None:
    packs = _PackCache(store, hasher)
    with ConfinedDir(target) as root:
        for e in entries[1:]:
            if e.type == "dir":
                root.mkdir(e.path)
            elif e.type == "file":
                with open(root.create(e.path), "wb") as fh:
                    if e.pack is not None:
                        fh.write(packs.read(e))
                    for digest, _ in e.chunks:
                        fh.write(store.get(digest))
            elif e.type == "symlink":
                assert e.target is not None
                root.symlink(e.target, e.path)
            elif e.type == "hardlink":
                assert e.target is not None
                root.link(e.target, e.path)
            else:
                root.mknod(e.path, TYPE_BITS[e.type] | 0o600, e.rdev or 0)
        for e in reversed(entries):
            if e.type != "hardlink":
                root.set_attrs(e.path, uid=e.uid, gid=e.gid,
                               mode=None if e.type == "symlink" else e.mode,
                               mtime_ns=e.mtime_ns, xattrs=e.xattrs)


# -- stacking ---------------------------------------------------------------------


def stack(layers: Iterable[Manifest]) -> Manifest:
    """Merge layers bottom-to-top the OCI way: ``.wh.NAME`` deletes NAME (and below),
    ``.wh..wh..opq`` hides everything the lower layers had in its directory, and a
    non-directory replacing a directory hides that directory's subtree.

    A hardlink whose target a later layer replaced or deleted becomes a copy of
    the file it linked to.
    """
    merged: dict[str, Entry] = {}
    links: dict[int, Entry] = {}  # id(hardlink entry) -> the entry it linked to

    def drop_below(prefix: str) -> None:
        pre = "" if prefix == "." else prefix + "/"
        for p in [p for p in merged if p.startswith(pre) and p != prefix]:
            del merged[p]

    hasher = "blake3"
    for layer in layers:
        hasher = layer.hasher
        own = layer.by_path()
        # Whiteouts act on the layers below only, so apply them all before adding
        # this layer's own entries (a name may sort before its directory's marker).
        for e in layer:
            parent, _, name = e.path.rpartition("/")
            parent = parent or "."
            if name == OPAQUE:
                drop_below(parent)
            elif name.startswith(WHITEOUT):
                gone = (parent + "/" if parent != "." else "") + name[len(WHITEOUT):]
                merged.pop(gone, None)
                drop_below(gone)
        for e in layer:
            if e.path.rpartition("/")[2].startswith(WHITEOUT):
                continue
            old = merged.get(e.path)
            if old is not None and old.type == "dir" and e.type != "dir":
                drop_below(e.path)
            if e.type == "hardlink":
                if e.target not in own:
                    raise ManifestError(f"hardlink {e.path!r} points outside its layer")
                links[id(e)] = own[e.target]
            merged[e.path] = e
    out = []
    for p in sorted(merged, key=_sort_key):
        e = merged[p]
        if e.type == "hardlink" and merged.get(e.target) is not links[id(e)]:
            src = links[id(e)]
            e = Entry(**{**src.__dict__, "path": e.path})
        out.append(e)
    return Manifest(out, hasher)


# -- comparison -------------------------------------------------------------------


def _describe(root: str) -> tuple[dict[str, tuple], list[list[str]]]:
    info: dict[str, tuple] = {}
    groups: dict[tuple[int, int], list[str]] = {}
    for rel, path in _walk(root):
        st = os.lstat(path)
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFREG:
            h = hashlib.blake2b()
            with open(path, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
            extra: Any = h.hexdigest()
        elif fmt == stat.S_IFLNK:
            extra = os.readlink(path)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            extra = st.st_rdev
        else:
            extra = None
        if fmt != stat.S_IFDIR:
            groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
        info[rel] = (fmt, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                     st.st_size if fmt != stat.S_IFDIR else None, extra, _xattrs(path))
    return info, sorted(g for g in groups.values() if len(g) > 1)


def diff_trees(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> list[str]:
    """Differences between two trees in content, lstat metadata, xattrs and hardlinks
    (what ``rsync -naHAX --checksum`` would report, plus mtimes); [] when identical."""
    fields = ("type", "mode", "uid", "gid", "mtime_ns", "size", "content", "xattrs")
    ia, ga = _describe(os.fspath(a))
    ib, gb = _describe(os.fspath(b))
    out = [f"only in {a}: {p}" for p in sorted(ia.keys() - ib.keys())]
    out += [f"only in {b}: {p}" for p in sorted(ib.keys() - ia.keys())]
    for p in sorted(ia.keys() & ib.keys()):
        for name, x, y in zip(fields, ia[p], ib[p], strict=True):
            if x != y:
                out.append(f"{p}: {name} {x!r} != {y!r}")
    if ga != gb:
        out.append(f"hardlink groups differ: {len(ga)} vs {len(gb)}")
    return out
