"""Import a directory tree, a rootfs tarball, an OCI image layout or a docker-save
tarball as an image of layered file-tree manifests.

Tarballs are unpacked into a scratch directory inside the store (same
filesystem, removed afterwards) and captured from there, so owners, modes,
device nodes and xattrs go through the one capture path that also serves
directories. Each OCI layer becomes its own tree manifest; its ``.wh.`` files
are kept as they are and applied when layers are stacked.

Archives are hostile input: every member, and every path an OCI or docker-save
document names, is resolved beneath its root and never through a symlink
(:mod:`stellarium_core.confined`), and every document field is type-checked.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from stellarium_core.confined import ConfinedDir, UnsafePathError
from stellarium_core.distribution.images import ImageError, ImageManifest, ImageStore, check_name
from stellarium_core.errors import UsageError
from stellarium_core.fsutil import claim, remove_tree, sweep_unclaimed
from stellarium_core.hookspecs import Chunker, Hasher
from stellarium_core.nebula.pending import RefJournal
from stellarium_core.volumes import filetree

_OCI_CONFIG_KEYS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User")
#: Prefix of scratch trees under ``<store>/images`` (``stellar gc`` sweeps dead ones too).
SCRATCH = ".import-"
#: What reading a truncated or corrupt (gzip, bzip2, xz) tar raises.
_DAMAGED_ARCHIVE = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)
#: Index, manifest and config documents are small; a bigger one is not what it claims.
MAX_JSON = 16 << 20


def _relative(name: str, what: str) -> str:
    """A path an archive names, made relative (leading ``/`` and ``.`` parts
    dropped, as tar does); ``..`` is refused."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"{what} {name!r} escapes the image root")
    return "/".join(parts) or "."


def _extract(tar: tarfile.TarFile, m: tarfile.TarInfo, rel: str, root: ConfinedDir) -> bool:
    """Create one member beneath ``root``; whether it takes the member's attributes."""
    if m.isdir():
        root.mkdir(rel, 0o700, replace=True)
    elif m.isreg():
        src = tar.extractfile(m)
        assert src is not None
        with src, open(root.create(rel, 0o600, replace=True), "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    elif m.issym():
        root.symlink(m.linkname, rel, replace=True)
    elif m.islnk():
        root.link(_relative(m.linkname, f"tar hardlink {m.name!r} ->"), rel, replace=True)
        return False  # the inode keeps the attributes of the member it links to
    elif m.ischr() or m.isblk() or m.isfifo():
        kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
        root.mknod(rel, kind | 0o600, os.makedev(m.devmajor, m.devminor), replace=True)
    else:
        raise ImageError(f"tar member {m.name!r} has an unsupported type {m.type!r}")
    return True


def _unpack(tarball: str | os.PathLike[str] | BinaryIO, dest: str) -> None:
    """Extract a tar into ``dest``; every member lands beneath it, never through a
    symlink an earlier member planted (see :mod:`stellarium_core.confined`)."""
    what = getattr(tarball, "name", tarball)
    try:
        with (tarfile.open(tarball, "r:*") if isinstance(tarball, (str, os.PathLike))
              else tarfile.open(fileobj=tarball, mode="r:*")) as tar, \
                ConfinedDir(dest, make_parents=True) as root:
            attrs: dict[str, tarfile.TarInfo] = {}
            # The tree is captured from here by path, so no path may outgrow the system's.
            room = os.pathconf(dest, "PC_PATH_MAX") - len(os.fsencode(dest)) - 2
            for m in tar:
                rel = _relative(m.name, "tar member")
                if rel == ".":
                    continue
                if len(os.fsencode(rel)) > room:
                    raise ImageError(f"{what}: tar member {m.name[:60]!r}... is a path of "
                                     f"{len(os.fsencode(rel))} bytes, nested deeper than a "
                                     f"path can reach here ({room} bytes)")
                try:
                    if _extract(tar, m, rel, root):
                        attrs[rel] = m
                    else:
                        attrs.pop(rel, None)
                except UnsafePathError as exc:
                    raise ImageError(f"{what}: {exc}") from None
                except (OSError, ValueError, OverflowError) as exc:
                    raise ImageError(f"{what}: cannot unpack member {m.name!r}: "
                                     f"{getattr(exc, 'strerror', None) or exc}") from None
            # Children first, so directory times survive what was written into them.
            for rel in sorted(attrs, key=lambda r: r.count("/"), reverse=True):
                m = attrs[rel]
                try:
                    root.set_attrs(rel, uid=m.uid, gid=m.gid,
                                   mode=None if m.issym() else m.mode & 0o7777,
                                   mtime_ns=int(m.mtime) * 10**9)
                except (OSError, ValueError, OverflowError) as exc:
                    raise ImageError(f"{what}: cannot set the attributes of {m.name!r}: "
                                     f"{getattr(exc, 'strerror', None) or exc}") from None
    except _DAMAGED_ARCHIVE as exc:
        raise ImageError(f"{what}: cannot unpack: {exc}") from None


class Importer:
    """Captures sources into layer manifests and binds them to a name."""

    def __init__(self, images: ImageStore, chunker: Chunker, hasher: Hasher) -> None:
        self.images, self.chunker, self.hasher = images, chunker, hasher
        self._journal: RefJournal | None = None  # the running import's, see import_path

    @contextmanager
    def _scratch(self) -> Iterator[str]:
        """A scratch tree, claimed while in use (see :func:`fsutil.claim`)."""
        path, fd = claim(self.images.root, SCRATCH, directory=True)
        try:
            yield str(path)
        finally:
            remove_tree(path)
            os.close(fd)

    def _capture(self, root: str) -> filetree.Manifest:
        return filetree.capture(root, self.images.store, self.chunker, self.hasher,
                                journal=self._journal)

    def _capture_tar(self, tarball: str | os.PathLike[str] | BinaryIO) -> filetree.Manifest:
        with self._scratch() as scratch:
            _unpack(tarball, scratch)
            os.chmod(scratch, 0o755)
            return self._capture(scratch)

    def import_path(self, source: str | os.PathLike[str], name: str) -> bytes:
        """Import whatever ``source`` is; returns the image manifest digest.

        Layers are captured first, their references journaled (so a killed
        import leaks nothing ``gc`` cannot release); the journal is dropped just
        before the layer manifests take the references over and the name is bound.
        """
        check_name(name)
        sweep_unclaimed(self.images.root, SCRATCH)  # what killed imports left
        with self.images.store.pending() as journal:
            self._journal = journal
            try:
                layers, config = self._layers(Path(source))
            finally:
                self._journal = None
            journal.settle()
            with self.images.locked():
                digests = [self.images.add_captured(m) for m in layers]
                return self.images.bind(name, ImageManifest(digests, self.hasher.name, config))

    def _layers(self, src: Path) -> tuple[list[filetree.Manifest], dict[str, Any]]:
        """The captured layers of ``src`` (bottom first) and its run config."""
        try:
            st = src.stat()
        except FileNotFoundError:
            raise UsageError(f"{src}: no such file or directory") from None
        if stat.S_ISDIR(st.st_mode):
            if (src / "oci-layout").exists() and (src / "index.json").exists():
                with ConfinedDir(src) as layout:
                    return self._oci(layout)
            return [self._capture(str(src))], {}
        if not stat.S_ISREG(st.st_mode):
            kind = _KIND_NAMES.get(stat.S_IFMT(st.st_mode), "special file")
            raise UsageError(f"{src} is a {kind}, not a directory or a tar archive")
        try:
            if not tarfile.is_tarfile(src):
                raise UsageError(f"{src}: not a directory or a tar archive")
            with tarfile.open(src, "r:*") as tar:
                top = set(tar.getnames())
        except _DAMAGED_ARCHIVE as exc:
            raise ImageError(f"{src}: cannot read the archive: {exc}") from None
        if "manifest.json" in top or "./manifest.json" in top or "oci-layout" in top:
            with self._scratch() as scratch, ConfinedDir(scratch) as archive:
                _unpack(src, scratch)
                if (Path(scratch) / "oci-layout").exists():
                    return self._oci(archive)
                return self._docker(archive)
        return [self._capture_tar(src)], {}

    # -- OCI and docker-save ---------------------------------------------------------
    # Every path these formats name (index, manifest, config, layers) is opened
    # beneath the layout or archive root, never through a symlink leading out.

    @staticmethod
    def _open(root: ConfinedDir, rel: str, what: str) -> BinaryIO:
        try:
            return open(root.open_read(_relative(rel, what)), "rb")
        except FileNotFoundError:
            raise ImageError(f"{what} {rel!r} is missing from {root.path}") from None
        except UnsafePathError as exc:
            raise ImageError(f"{what} {rel!r}: {exc}") from None

    @staticmethod
    def _load_json(fh: BinaryIO, what: str) -> Any:
        with fh:
            data = fh.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise ImageError(f"{what} is larger than {MAX_JSON} bytes")
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ImageError(f"{what} is not JSON: {exc}") from None

    def _json(self, root: ConfinedDir, rel: str, what: str) -> Any:
        return self._load_json(self._open(root, rel, what), f"{what} {rel!r}")

    def _blob(self, layout: ConfinedDir, digest: str) -> BinaryIO:
        """An OCI blob, checked against its sha256 name and rewound."""
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
            raise ImageError(f"unsupported or malformed OCI digest {digest!r}")
        fh = self._open(layout, f"blobs/sha256/{hexd}", "OCI blob")
        h = hashlib.sha256()
        while block := fh.read(1 << 20):
            h.update(block)
        if h.hexdigest() != hexd:
            fh.close()
            raise ImageError(f"OCI blob {digest} in {layout.path} does not match its "
                             "digest (corrupt)")
        fh.seek(0)
        return fh

    def _blob_json(self, layout: ConfinedDir, digest: str) -> Any:
        return self._load_json(self._blob(layout, digest), f"OCI blob {digest}")

    def _oci(self, layout: ConfinedDir) -> tuple[list[filetree.Manifest], dict[str, Any]]:
        index = self._json(layout, "index.json", "OCI index")
        manifests = _field(index, "manifests", list, "OCI index.json", [])
        if not manifests:
            raise ImageError(f"{layout.path}/index.json lists no image")
        man = self._blob_json(layout, _digest(manifests[0], "OCI index.json manifest"))
        if "manifests" in man:  # an image index: take the first (platform) manifest
            platforms = _field(man, "manifests", list, "OCI image index")
            if not platforms:
                raise ImageError("OCI image index lists no manifest")
            man = self._blob_json(layout, _digest(platforms[0], "OCI image index entry"))
        layers = _field(man, "layers", list, "OCI manifest", [])
        for layer in layers:
            if "zstd" in _field(layer, "mediaType", str, "OCI layer descriptor", ""):
                raise ImageError(f"layer {_digest(layer, 'OCI layer')}: zstd layers are not "
                                 "supported")
        config = self._blob_json(layout, _digest(_field(man, "config", dict, "OCI manifest"),
                                                 "OCI config descriptor"))
        return self._capture_layers(
            [lambda d=_digest(layer, "OCI layer"): self._blob(layout, d) for layer in layers],
            config)

    def _docker(self, root: ConfinedDir) -> tuple[list[filetree.Manifest], dict[str, Any]]:
        manifest = self._json(root, "manifest.json", "docker-save manifest")
        if not isinstance(manifest, list) or not manifest:
            raise ImageError("docker-save manifest.json lists no image")
        entry = manifest[0]
        config = self._json(root, _field(entry, "Config", str, "docker-save manifest entry"),
                            "docker-save config")
        layers = _field(entry, "Layers", list, "docker-save manifest entry", [])
        if not all(isinstance(rel, str) for rel in layers):
            raise ImageError("docker-save manifest entry: 'Layers' must list paths (strings)")
        return self._capture_layers(
            [lambda rel=rel: self._open(root, rel, "docker-save layer") for rel in layers],
            config)

    def _capture_layers(self, layers: list[Callable[[], BinaryIO]],
                        config: Any) -> tuple[list[filetree.Manifest], dict[str, Any]]:
        """Capture each layer (opened one at a time); the run config's kept keys."""
        if not layers:
            raise ImageError("the image has no layers")
        run = _field(config, "config", dict, "image config", None) or {}
        keep = {k: run[k] for k in _OCI_CONFIG_KEYS if run.get(k)}
        for k, v in keep.items():
            ok = isinstance(v, str) if k in ("WorkingDir", "User") else (
                isinstance(v, list) and all(isinstance(x, str) for x in v))
            if not ok:
                raise ImageError(f"image config: {k!r} has the wrong type "
                                 f"({type(v).__name__}: {v!r:.80})")
        captured: list[filetree.Manifest] = []
        try:
            for open_layer in layers:
                with open_layer() as fh:
                    captured.append(self._capture_tar(fh))
        except BaseException:
            if self._journal is not None:
                self._journal.settle()  # first: a crash now leaks, never releases twice
            for m in captured:
                filetree.release(m, self.images.store)
            raise
        return captured, keep


_REQUIRED = object()
_KIND_NAMES = {stat.S_IFIFO: "FIFO", stat.S_IFCHR: "character device",
               stat.S_IFBLK: "block device", stat.S_IFSOCK: "socket"}


def _field(doc: Any, key: str, kind: type, what: str, default: Any = _REQUIRED) -> Any:
    """``doc[key]`` of the JSON type ``kind`` (or ``default`` when absent or null);
    anything else is one ImageError naming the document and the key."""
    if not isinstance(doc, dict):
        raise ImageError(f"{what} is not a JSON object ({type(doc).__name__})")
    value = doc.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ImageError(f"{what} has no {key!r}")
        return default
    if not isinstance(value, kind):
        raise ImageError(f"{what}: {key!r} must be a JSON {_JSON_NAMES[kind]}, got "
                         f"{type(value).__name__} {value!r:.60}")
    return value


_JSON_NAMES = {dict: "object", list: "array", str: "string"}


def _digest(descriptor: Any, what: str) -> str:
    return _field(descriptor, "digest", str, what)
