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
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from stellarium_core.distribution.images import ImageError, ImageManifest, ImageStore, check_name
from stellarium_core.errors import UsageError
from stellarium_core.hookspecs import Chunker, Hasher
from stellarium_core.volumes import filetree

_OCI_CONFIG_KEYS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User")


def _safe_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Members with relative names and no ``..``; hardlinks likewise. Symlink
    targets are kept as they are: inside the image they resolve against its root.
    (Writes through a symlinked parent are refused while unpacking.)"""
    out = []
    for m in tar.getmembers():
        name = m.name.lstrip("/")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ImageError(f"tar member {m.name!r} escapes the image root")
        if not parts:
            continue
        m.name = "/".join(parts)
        if m.islnk():
            target = [p for p in m.linkname.lstrip("/").split("/") if p not in ("", ".")]
            if ".." in target:
                raise ImageError(f"tar hardlink {m.name!r} -> {m.linkname!r} escapes the root")
            m.linkname = "/".join(target)
        out.append(m)
    return out


def _unpack(tarball: str | os.PathLike[str], dest: str) -> None:
    try:
        with tarfile.open(tarball, "r:*") as tar:
            members = _safe_members(tar)
            for m in members:
                # One by one, so the symlink check sees links made by earlier members.
                parent = os.path.realpath(os.path.join(dest, os.path.dirname(m.name)))
                if parent != os.path.realpath(dest) and not parent.startswith(
                        os.path.realpath(dest) + "/"):
                    raise ImageError(f"tar member {m.name!r} would be written through a "
                                     "symlink outside the image root")
                tar.extract(m, dest, set_attrs=True, numeric_owner=True,
                            filter="fully_trusted")
            # Directory mtimes were disturbed by the files written into them.
            for m in members:
                if m.isdir():
                    os.utime(os.path.join(dest, m.name), (m.mtime, m.mtime),
                             follow_symlinks=False)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ImageError(f"{tarball}: cannot unpack: {exc}") from None


class Importer:
    """Captures sources into layer manifests and binds them to a name."""

    def __init__(self, images: ImageStore, chunker: Chunker, hasher: Hasher) -> None:
        self.images, self.chunker, self.hasher = images, chunker, hasher

    def _scratch(self) -> str:
        return tempfile.mkdtemp(prefix=".import-", dir=self.images.root)

    def _capture(self, root: str) -> filetree.Manifest:
        return filetree.capture(root, self.images.store, self.chunker, self.hasher)

    def _capture_tar(self, tarball: str | os.PathLike[str]) -> filetree.Manifest:
        scratch = self._scratch()
        try:
            _unpack(tarball, scratch)
            os.chmod(scratch, 0o755)
            return self._capture(scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

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
                return self._import_oci(src, name)
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
                if (Path(scratch) / "oci-layout").exists():
                    return self._import_oci(Path(scratch), name)
                return self._import_docker(Path(scratch), name)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return self._bind(name, [self._capture_tar(src)], {})

    # -- OCI and docker-save ---------------------------------------------------------

    @staticmethod
    def _blob(layout: Path, digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
            raise ImageError(f"unsupported or malformed OCI digest {digest!r}")
        p = layout / "blobs" / "sha256" / hexd
        h = hashlib.sha256()
        try:
            with open(p, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
        except FileNotFoundError:
            raise ImageError(f"OCI blob {digest} is missing from {layout}") from None
        if h.hexdigest() != hexd:
            raise ImageError(f"OCI blob {p} does not match its digest {digest} (corrupt)")
        return p

    def _json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ImageError(f"{path}: unreadable: {exc}") from None

    def _import_oci(self, layout: Path, name: str) -> bytes:
        index = self._json(layout / "index.json")
        manifests = index.get("manifests") or []
        if not manifests:
            raise ImageError(f"{layout}/index.json lists no image")
        desc = manifests[0]
        man = json.loads(self._blob(layout, desc["digest"]).read_bytes())
        if "manifests" in man:  # an image index: take the first (platform) manifest
            man = json.loads(self._blob(layout, man["manifests"][0]["digest"]).read_bytes())
        for layer in man.get("layers", []):
            if "zstd" in layer.get("mediaType", ""):
                raise ImageError(f"layer {layer['digest']}: zstd layers are not supported")
        config = json.loads(self._blob(layout, man["config"]["digest"]).read_bytes())
        tars = [self._blob(layout, layer["digest"]) for layer in man.get("layers", [])]
        return self._import_layers(tars, config.get("config") or {}, name)

    def _import_docker(self, root: Path, name: str) -> bytes:
        manifest = self._json(root / "manifest.json")
        if not isinstance(manifest, list) or not manifest:
            raise ImageError("docker-save manifest.json lists no image")
        entry = manifest[0]
        config = self._json(root / entry["Config"])
        tars = []
        for rel in entry.get("Layers", []):
            p = (root / rel).resolve()
            if not str(p).startswith(str(root.resolve()) + "/") or not p.is_file():
                raise ImageError(f"docker-save layer {rel!r} is missing or outside the archive")
            tars.append(p)
        return self._import_layers(tars, config.get("config") or {}, name)

    def _import_layers(self, tars: list[Path], config: dict[str, Any], name: str) -> bytes:
        if not tars:
            raise ImageError("the image has no layers")
        captured: list[filetree.Manifest] = []
        try:
            for t in tars:
                captured.append(self._capture_tar(t))
        except BaseException:
            for m in captured:
                filetree.release(m, self.images.store)
            raise
        keep = {k: config[k] for k in _OCI_CONFIG_KEYS if config.get(k)}
        return self._bind(name, captured, keep)
