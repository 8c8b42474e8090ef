"""Distribution: images (layered file-tree manifests), the CDN layout, HTTP pulls.

Public API::

    images = ImageStore(store_path / "images", chunk_store, hasher)
    images = ImageStore.for_host(host)          # the same, for a configured Host
    Importer(images, chunker, hasher).import_path(dir_or_tar_or_oci, name) -> digest
    publish(images, name, directory) -> Published
    Puller(images, base_url).pull(name, tag=... | digest=...) -> PullResult
    images.flatten(name) -> filetree.Manifest (layers stacked), images.listing()
    shared_chunks(images) -> distinct image chunks and those held by 2+ names
"""

from stellarium_core.distribution.cdn import Published, publish
from stellarium_core.distribution.fetch import Fetcher, FetchError, FetchPolicy
from stellarium_core.distribution.images import (
    ImageError,
    ImageManifest,
    ImageStore,
    shared_chunks,
)
from stellarium_core.distribution.importer import Importer
from stellarium_core.distribution.pull import Puller, PullResult, parse_url

__all__ = [
    "FetchError", "FetchPolicy", "Fetcher", "ImageError", "ImageManifest", "ImageStore",
    "Importer", "PullResult", "Published", "Puller", "parse_url", "publish", "shared_chunks",
]
