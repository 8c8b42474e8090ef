"""Images: named, layered file-tree manifests in ``<store>/images``.

Layout::

    images/index.json              {"images": {name: image-manifest hex}}
    images/manifests/<hex>.json    image manifests and layer (tree) manifests, by digest
    images/pulls/<hex>.json        journals of unfinished pulls (see pull.py)
    images/lock                    flock held while manifests or the index change

An image manifest is canonical JSON ``{"format": "stellarium-image", "version": 1,
"hasher", "layers": [tree-manifest hex, bottom first], "config": {...}}``; equal
images give equal bytes, so equal digests. The CDN layout carries the same bytes.

Reference counting: a layer manifest file in ``manifests/`` holds the NEBULA
references :func:`filetree.capture` takes (one per chunk per file entry, one per
pack), once, however many images list it. Layers and image manifests that no
index entry reaches any more are released and deleted under the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stellarium_core.errors import StellarError, UsageError
from stellarium_core.fsutil import fsync_dir, write_atomic
from stellarium_core.hookspecs import Hasher
from stellarium_core.volumes import filetree
from stellarium_core.volumes.tinyvol import ManifestError

FORMAT = "stellarium-image"
VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]{0,254}")
_HEX = re.compile(r"[0-9a-f]{64}")

if TYPE_CHECKING:
    from stellarium_core.host import Host


class ImageError(StellarError):
    """An image operation failed or an image is unknown; nothing was changed."""


def check_name(name: str) -> str:
    """``name`` if it is a valid image name (no ``..``), else a UsageError."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise UsageError(f"bad image name {name!r}: use letters, digits and . _ : / @ - "
                         "(max 255, not starting with a symbol)")
    return name


@dataclass
class ImageManifest:
    """The layers of an image (tree-manifest digests, bottom first) and its run config."""

    layers: list[bytes]
    hasher: str = "blake3"
    config: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return filetree.canonical_json({"format": FORMAT, "version": VERSION,
                                        "hasher": self.hasher, "config": self.config,
                                        "layers": [d.hex() for d in self.layers]})

    @classmethod
    def decode(cls, data: bytes) -> ImageManifest:
        doc = filetree.parse_document(data, FORMAT, VERSION, "image manifest")
        layers, config = doc.get("layers"), doc.get("config", {})
        if (not isinstance(layers, list) or not layers
                or not all(isinstance(h, str) and _HEX.fullmatch(h) for h in layers)
                or not isinstance(config, dict)):
            raise ManifestError("image manifest has a bad layer list or config")
        return cls([bytes.fromhex(h) for h in layers], str(doc.get("hasher")), config)


class ImageStore:
    """The image index and manifests of one store."""

    def __init__(self, root: str | os.PathLike[str], store: Any, hasher: Hasher) -> None:
        self.root = Path(root)
        self.store, self.hasher = store, hasher
        self.manifests = self.root / "manifests"
        self.pulls = self.root / "pulls"
        self.manifests.mkdir(parents=True, exist_ok=True)
        self.pulls.mkdir(exist_ok=True)
        self._facts: dict[bytes, tuple[frozenset[bytes], int, int]] = {}

    @classmethod
    def for_host(cls, host: Host) -> ImageStore:
        """The image store of ``host``: ``<store>/images`` over its NEBULA store."""
        return cls(host.store_path / "images", host.store, host.hasher)

    # -- locking and the index ---------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive over index and manifests, across processes."""
        with open(self.root / "lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def index(self) -> dict[str, str]:
        """name -> image manifest hex."""
        try:
            doc = json.loads((self.root / "index.json").read_text())
        except FileNotFoundError:
            return {}
        except (ValueError, RecursionError) as exc:
            raise ImageError(f"{self.root / 'index.json'} is corrupt: {exc}") from None
        images = doc.get("images", {}) if isinstance(doc, dict) else None
        if not isinstance(images, dict) or not all(
                isinstance(v, str) and _HEX.fullmatch(v) for v in images.values()):
            raise ImageError(f"{self.root / 'index.json'} is corrupt: "
                             "expected {\"images\": {name: manifest digest hex}}")
        return dict(images)

    def _write_index(self, images: dict[str, str]) -> None:
        data = json.dumps({"images": dict(sorted(images.items()))}, indent=1) + "\n"
        write_atomic(self.root / "index.json", data.encode())

    def resolve(self, name: str) -> bytes:
        """The image manifest digest bound to ``name`` (or a full digest hex itself)."""
        images = self.index()
        if name in images:
            return bytes.fromhex(images[name])
        if _HEX.fullmatch(name) and (self.manifests / f"{name}.json").exists():
            return bytes.fromhex(name)
        raise ImageError(f"no image named {name!r} (see `stellar image ls`)")

    # -- manifests ----------------------------------------------------------------------

    def path(self, digest: bytes) -> Path:
        return self.manifests / f"{digest.hex()}.json"

    def has(self, digest: bytes) -> bool:
        """Whether the manifest is kept (its references held), intact or not."""
        return self.path(digest).exists()

    def intact(self, digest: bytes) -> bytes | None:
        """The kept manifest's bytes if they still match their digest, else None."""
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            return None
        return data if self.hasher.digest(data) == digest else None

    def read_bytes(self, digest: bytes) -> bytes:
        """A stored manifest's bytes, checked against its digest."""
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise ImageError(f"manifest {digest.hex()} is not in the store") from None
        if self.hasher.digest(data) != digest:
            raise ImageError(f"manifest {self.path(digest)} does not match its digest (corrupt)")
        return data

    def image(self, name_or_digest: str | bytes) -> ImageManifest:
        d = (name_or_digest if isinstance(name_or_digest, bytes)
             else self.resolve(name_or_digest))
        return ImageManifest.decode(self.read_bytes(d))

    def layer(self, digest: bytes) -> filetree.Manifest:
        return filetree.Manifest.decode(self.read_bytes(digest))

    def flatten(self, name_or_digest: str | bytes) -> filetree.Manifest:
        """The image's layers stacked into one tree (OCI whiteouts applied)."""
        return filetree.stack(self.layer(d) for d in self.image(name_or_digest).layers)

    # -- adding and removing ----------------------------------------------------------

    def add_captured(self, manifest: filetree.Manifest) -> bytes:
        """Keep a layer whose references capture took; call under :meth:`locked`.

        If the same layer is already kept, the duplicate references are given back
        (and a damaged copy of it is rewritten: re-importing heals it).
        """
        return filetree.save(manifest, self.manifests, self.hasher, self.store, held=True)

    def keep_pulled(self, layers: list[filetree.Manifest], held: set[bytes]) -> None:
        """Keep fetched layers; call under :meth:`locked`.

        ``held``: chunks that already carry one reference each for this pull (a
        fetch put them). They count towards the layers' references, and any the
        layers do not need (another pull kept the layer first) are released. A
        layer kept before but damaged since is rewritten (its references stand).
        """
        need: Counter[bytes] = Counter()
        todo: dict[bytes, bytes] = {}
        for m in layers:
            data = m.encode()
            digest = self.hasher.digest(data)
            if digest in todo:
                continue
            if not self.has(digest):
                todo[digest] = data
                need.update(filetree.references(m))
            elif self.intact(digest) is None:
                write_atomic(self.path(digest), data)
        surplus = [d for d in held if need[d] == 0]
        need.subtract(d for d in held if need[d] > 0)
        self.store.ref_many(+need)  # one durable commit for the whole layer set
        for digest, data in todo.items():
            write_atomic(self.path(digest), data)
        self.store.release_many(dict.fromkeys(surplus, 1))

    def bind(self, name: str, image: ImageManifest) -> bytes:
        """Write the image manifest and point ``name`` at it; call under :meth:`locked`."""
        check_name(name)
        for d in image.layers:
            if not self.has(d):
                raise ImageError(f"layer {d.hex()} of image {name!r} is not in the store")
        data = image.encode()
        digest = self.hasher.digest(data)
        if self.intact(digest) is None:
            write_atomic(self.path(digest), data)
        images = self.index()
        images[name] = digest.hex()
        self._write_index(images)
        self._drop(self._garbage(images, strict=False))
        return digest

    def remove(self, name: str) -> None:
        """Unbind ``name``; layers no other image uses are released and deleted.

        All or nothing: if a layer that would be released cannot be read (so its
        references cannot be known), nothing changes and the error says so.
        """
        with self.locked():
            images = self.index()
            if name not in images:
                raise ImageError(f"no image named {name!r}")
            gone = images.pop(name)
            drop = self._garbage(images, strict=True, image=gone)
            self._write_index(images)
            self._drop(drop)

    def _garbage(self, images: dict[str, str], strict: bool,
                 image: str = "") -> list[tuple[Path, filetree.Manifest | None]]:
        """Manifests no bound name reaches, each with its layer (None: an image manifest).

        An unreadable manifest cannot be released: ``strict`` makes that an error,
        else it is left in place for ``fsck`` to report. So is everything when a
        bound image itself is unreadable (what it reaches is then unknown).
        ``image`` is the hex of an image manifest just unbound: it holds no
        references, so it goes even when damaged.
        """
        live: set[str] = set()
        try:
            for hexd in set(images.values()):
                live.add(hexd)
                live.update(d.hex() for d in self.image(bytes.fromhex(hexd)).layers)
        except (ImageError, ManifestError) as exc:
            if strict:
                raise ImageError(f"{exc}; nothing was removed (re-import or re-pull that "
                                 "image, or run `stellar fsck --repair`)") from None
            return []
        out: list[tuple[Path, filetree.Manifest | None]] = []
        for p in sorted(self.manifests.glob("*.json")):
            hexd = p.name.removesuffix(".json")
            if hexd in live or not _HEX.fullmatch(hexd):
                continue
            if hexd == image:
                out.append((p, None))
                continue
            try:
                data = self.read_bytes(bytes.fromhex(hexd))
                doc = filetree.parse_json(data, "manifest")
                layer = (filetree.Manifest.decode(data)
                         if isinstance(doc, dict) and doc.get("format") == filetree.FORMAT
                         else None)
            except (ImageError, ManifestError) as exc:
                if strict:
                    raise ImageError(f"layer manifest {p.name} cannot be read ({exc}), so the "
                                     "references it holds are unknown; nothing was removed "
                                     "(re-import or re-pull the image to rewrite it, or run "
                                     "`stellar fsck --repair` to set it aside)") from None
                continue
            out.append((p, layer))
        return out

    def _drop(self, garbage: list[tuple[Path, filetree.Manifest | None]]) -> None:
        """Delete manifests, durably, then release what their layers held: a crash in
        between leaks references, never frees a chunk a manifest still lists."""
        if not garbage:
            return
        refs: Counter[bytes] = Counter()
        for p, layer in garbage:
            p.unlink()
            if layer is not None:
                refs.update(filetree.references(layer))
        fsync_dir(self.manifests)
        self.store.release_many(refs)

    # -- queries ---------------------------------------------------------------------------

    def layer_facts(self, digest: bytes) -> tuple[frozenset[bytes], int, int]:
        """(NEBULA chunks held, entries, file bytes) of a layer.

        Remembered per digest (a digest's content never changes), so listing
        and store-wide counts decode each layer manifest once, not once each.
        """
        facts = self._facts.get(digest)
        if facts is None:
            layer = self.layer(digest)
            facts = (frozenset(filetree.references(layer)), len(layer),
                     sum(e.size for e in layer if e.type == "file"))
            self._facts[digest] = facts
        return facts

    def listing(self) -> list[dict[str, Any]]:
        """One row per name: digest, layers, entries, logical bytes, chunks shared with others."""
        images = self.index()
        chunks_of: dict[str, set[bytes]] = {}
        rows = []
        for name, hexd in sorted(images.items()):
            im = self.image(bytes.fromhex(hexd))
            own: set[bytes] = set()
            entries = size = 0
            for d in im.layers:
                chunks, n, nbytes = self.layer_facts(d)
                own |= chunks
                entries += n
                size += nbytes
            chunks_of[name] = own
            rows.append({"name": name, "digest": hexd, "layers": len(im.layers),
                         "entries": entries, "bytes": size, "chunks": len(own)})
        for row in rows:
            others = set().union(*(c for n, c in chunks_of.items() if n != row["name"]))
            row["shared_chunks"] = len(chunks_of[row["name"]] & others)
        return rows


def shared_chunks(images: ImageStore) -> dict[str, int]:
    """Store-wide figures: distinct chunks the images hold, and how many of them
    more than one image name holds (what a sibling pull did not have to fetch)."""
    seen: Counter[bytes] = Counter()
    cache: dict[str, set[bytes]] = {}
    for hexd in images.index().values():  # per name: two names of one image share all
        if hexd not in cache:
            cache[hexd] = set()
            for d in images.image(bytes.fromhex(hexd)).layers:
                cache[hexd] |= images.layer_facts(d)[0]
        seen.update(cache[hexd])
    return {"image_chunks": len(seen),
            "chunks_shared_between_images": sum(1 for n in seen.values() if n > 1)}
