"""The VM form of images: one store for VMs and containers.

An image imported once runs as a container (its file-tree manifest) and boots
as a VM from an EROFS disk built over the same chunks
(:mod:`stellarium_core.volumes.imagedisk`). This module ties the two catalogs
together: build or find the disk of an image name, drop disks whose image is
gone, and count what VM volumes and container images share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stellarium_core.distribution.images import ImageStore
from stellarium_core.volumes.imagedisk import ImageDisks
from stellarium_core.volumes.tinyvol import ExtentMap
from stellarium_core.volumes.volume import VolumeStore


@dataclass
class VmDisk:
    """The disk of one image, and what it costs on top of the image."""

    image: bytes
    disk: ExtentMap
    built: bool
    added_bytes: int          # bytes of chunks the disk holds that the image does not
    image_bytes: int          # bytes of the image's own unique chunks


def _image_chunks(images: ImageStore, digest: bytes) -> set[bytes]:
    out: set[bytes] = set()
    for layer in images.image(digest).layers:
        out |= images.layer_facts(layer)[0]
    return out


def vm_disk(images: ImageStore, disks: ImageDisks, name: str) -> VmDisk:
    """The VM disk of image ``name`` (a name or a manifest digest), built on first use.

    Runs under the image lock, so an image removed meanwhile cannot leave a disk
    behind; disks of images no name binds any more are pruned on the way.
    """
    with images.locked():
        digest = images.resolve(name)
        disk, built = disks.ensure(digest, lambda: images.flatten(digest))
        _prune(images, disks)
        own = _image_chunks(images, digest)
    size = images.store.size
    return VmDisk(digest, disk, built, sum(size(d) for d in disk.digests() - own),
                  sum(size(d) for d in own))


def _prune(images: ImageStore, disks: ImageDisks) -> list[bytes]:
    live = {bytes.fromhex(h) for h in images.index().values()}
    return disks.prune(live)[0]


def prune_vm_disks(images: ImageStore, disks: ImageDisks) -> list[bytes]:
    """Remove the disks of images no name binds (``stellar image rm``, ``stellar gc``);
    a disk a running VM holds open stays until the next prune. Returns the removed."""
    with images.locked():
        return _prune(images, disks)


def sharing(images: ImageStore, volumes: VolumeStore, disks: ImageDisks) -> dict[str, Any]:
    """Chunks and bytes held by VM volumes (TinyVol volumes, bases and image disks),
    by container images, and by both."""
    container: set[bytes] = set()
    for hexd in set(images.index().values()):
        container |= _image_chunks(images, bytes.fromhex(hexd))
    per_disk = disks.chunks()
    vm = volumes.chunks().union(*per_disk.values())
    size = images.store.size

    def nbytes(chunks: set[bytes]) -> int:
        return sum(size(d) for d in chunks)

    both = vm & container
    return {"vm_disks": len(per_disk), "volumes": len(volumes.names()),
            "vm_chunks": len(vm), "vm_bytes": nbytes(vm),
            "image_chunks": len(container), "image_bytes": nbytes(container),
            "shared_chunks": len(both), "shared_bytes": nbytes(both),
            "vm_only_bytes": nbytes(vm - container)}
