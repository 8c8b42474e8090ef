"""Publish an image as the CDN layout: static files any HTTP server can serve.

::

    DIR/manifests/<hex>.json   the image manifest and each layer's tree manifest
    DIR/blobs/<hex>            every chunk and Cosmic Pack, raw (uncompressed) bytes
    DIR/tags/<name>            the image manifest's hex, so a pull can start from a name

Every file is named by the hash of its bytes (tags excepted), written under a
temporary name and renamed, so a server never serves half a file. Publishing
into a directory that already holds a sibling image adds only the new blobs.

With ``gzip=True`` a blob that gzip shrinks by at least an eighth also gets a
``blobs/<hex>.gz`` sibling, which nginx's ``gzip_static`` (and most CDNs) send
as ``Content-Encoding: gzip`` to clients that accept it; the raw file stays, so
plain static servers keep working.
"""

from __future__ import annotations

import gzip as gzipmod
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from stellarium_core.distribution.images import ImageStore
from stellarium_core.fsutil import write_atomic
from stellarium_core.volumes import filetree


@dataclass(frozen=True)
class Published:
    """What a publish wrote: manifest digest, tag path, blobs written and skipped."""

    digest: bytes
    tag: str
    blobs_written: int
    blobs_skipped: int
    bytes_written: int
    gzipped: int = 0


def _write(path: Path, data: bytes) -> None:
    """Publish one file: world-readable for the web server, never seen half-written."""
    write_atomic(path, data, durable=False, mode=0o644)


def publish(images: ImageStore, name: str, directory: str | os.PathLike[str], *,
            gzip: bool = False) -> Published:
    """Write image ``name`` (and whatever it needs) into the CDN layout at ``directory``."""
    out = Path(directory)
    for sub in ("manifests", "blobs", "tags"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    digest = images.resolve(name)
    image = images.image(digest)
    written = skipped = nbytes = gzipped = 0
    for ld in image.layers:
        for chunk in filetree.references(images.layer(ld)):
            target = out / "blobs" / chunk.hex()
            if target.exists():
                skipped += 1
                continue
            data = images.store.get(chunk)  # verified read: never publish bad bytes
            if gzip:
                packed = gzipmod.compress(data, compresslevel=6, mtime=0)
                if len(packed) <= len(data) - len(data) // 8:
                    _write(target.with_name(target.name + ".gz"), packed)
                    gzipped += 1
            _write(target, data)  # last: a present raw blob means the blob is complete
            written += 1
            nbytes += len(data)
    # Manifests after blobs, tag last: a reader that sees a name finds all it needs.
    for d in (*image.layers, digest):
        target = out / "manifests" / f"{d.hex()}.json"
        if not target.exists():
            _write(target, images.read_bytes(d))
    tag = "tags/" + quote(name, safe="")
    _write(out / tag, (digest.hex() + "\n").encode())
    return Published(digest, tag, written, skipped, nbytes, gzipped)
