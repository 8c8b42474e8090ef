"""Import a directory tree, a rootfs tarball, an OCI image layout or a docker-save
tarball as an image of layered file-tree manifests.

Tarballs are unpacked into a scratch directory inside the store (same
filesystem, removed afterwards) and captured from there, so owners, modes,
device nodes and xattrs go through the one capture path that also serves
directories. Each OCI layer becomes its own tree manifest; its ``.wh.`` files
are kept as they are and applied when layers are stacked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from stellarium_core.confined import ConfinedDir, UnsafePathError
from stellarium_core.distribution.images import ImageError, ImageManifest, ImageStore, check_name
from stellarium_core.errors import UsageError
from stellarium_core.fsutil import remove_tree
from stellarium_core.hookspecs import Chunker, Hasher
from stellarium_core.volumes import filetree

_OCI_CONFIG_KEYS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User")
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
            for m in tar:
                rel = _relative(m.name, "tar member")
                if rel == ".":
                    continue
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
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ImageError(f"{what}: cannot unpack: {exc}") from None


class Importer:
    """Captures sources into layer manifests and binds them to a name."""

    def __init__(self, images: ImageStore, chunker: Chunker, hasher: Hasher) -> None:
        self.images, self.chunker, self.hasher = images, chunker, hasher

    def _scratch(self) -> str:
        return tempfile.mkdtemp(prefix=".import-", dir=self.images.root)

    def _capture(self, root: str) -> filetree.Manifest:
        return filetree.capture(root, self.images.store, self.chunker, self.hasher)

    def _capture_tar(self, tarball: str | os.PathLike[str] | BinaryIO) -> filetree.Manifest:
        scratch = self._scratch()
        try:
            _unpack(tarball, scratch)
            os.chmod(scratch, 0o755)
            return self._capture(scratch)
        finally:
            remove_tree(scratch)

    def _bind(self, name: str, layers: list[filetree.Manifest],
              config: dict[str, Any]) -> bytes:
        with self.images.locked():
            digests = [self.images.add_captured(m) for m in layers]
            return self.images.bind(name, ImageManifest(digests, self.hasher.name, config))

    def import_path(self, source: str | os.PathLike[str], name: str) -> bytes:
        """Import whatever ``source`` is; returns the image manifest digest."""
        check_name(name)
        src = Path(source)
        if src.is_dir():
            if (src / "oci-layout").exists() and (src / "index.json").exists():
                with ConfinedDir(src) as layout:
                    return self._import_oci(layout, name)
            return self._bind(name, [self._capture(str(src))], {})
        if not src.is_file():
            raise UsageError(f"{src}: no such file or directory")
        if not tarfile.is_tarfile(src):
            raise UsageError(f"{src}: not a directory or a tar archive")
        with tarfile.open(src, "r:*") as tar:
            top = set(tar.getnames())
        if "manifest.json" in top or "./manifest.json" in top or "oci-layout" in top:
            scratch = self._scratch()
            try:
                _unpack(src, scratch)
                with ConfinedDir(scratch) as archive:
                    if (Path(scratch) / "oci-layout").exists():
                        return self._import_oci(archive, name)
                    return self._import_docker(archive, name)
            finally:
                remove_tree(scratch)
        return self._bind(name, [self._capture_tar(src)], {})

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

    def _import_oci(self, layout: ConfinedDir, name: str) -> bytes:
        index = self._json(layout, "index.json", "OCI index")
        manifests = index.get("manifests") or []
        if not manifests:
            raise ImageError(f"{layout.path}/index.json lists no image")
        desc = manifests[0]
        man = self._blob_json(layout, desc["digest"])
        if "manifests" in man:  # an image index: take the first (platform) manifest
            man = self._blob_json(layout, man["manifests"][0]["digest"])
        for layer in man.get("layers", []):
            if "zstd" in layer.get("mediaType", ""):
                raise ImageError(f"layer {layer['digest']}: zstd layers are not supported")
        config = self._blob_json(layout, man["config"]["digest"])
        return self._import_layers(
            [lambda d=layer["digest"]: self._blob(layout, d) for layer in man.get("layers", [])],
            config.get("config") or {}, name)

    def _import_docker(self, root: ConfinedDir, name: str) -> bytes:
        manifest = self._json(root, "manifest.json", "docker-save manifest")
        if not isinstance(manifest, list) or not manifest:
            raise ImageError("docker-save manifest.json lists no image")
        entry = manifest[0]
        config = self._json(root, entry["Config"], "docker-save config")
        layers = entry.get("Layers", [])
        return self._import_layers(
            [lambda rel=rel: self._open(root, rel, "docker-save layer") for rel in layers],
            config.get("config") or {}, name)

    def _import_layers(self, layers: list[Callable[[], BinaryIO]], config: dict[str, Any],
                       name: str) -> bytes:
        """Capture each layer (opened one at a time) and bind them as ``name``."""
        if not layers:
            raise ImageError("the image has no layers")
        captured: list[filetree.Manifest] = []
        try:
            for open_layer in layers:
                with open_layer() as fh:
                    captured.append(self._capture_tar(fh))
        except BaseException:
            for m in captured:
                filetree.release(m, self.images.store)
            raise
        keep = {k: config[k] for k in _OCI_CONFIG_KEYS if config.get(k)}
        return self._bind(name, captured, keep)
