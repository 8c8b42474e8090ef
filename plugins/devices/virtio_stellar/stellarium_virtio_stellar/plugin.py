"""The ``virtio-stellar`` device plugin: ``volt run --device virtio-stellar,volume=NAME``
or ``...,image=NAME``.

It opens the named volume from the store of the host the VMM runs for (its
``--config``, handed over in the :class:`DeviceContext`) and serves it to the guest
as a standard virtio-blk disk, so an unmodified Linux ``virtio_blk`` driver reads
and writes Stellarium storage. ``image=NAME`` serves an image's VM form instead,
a read-only EROFS disk over the same chunks the container form uses (built on
first use).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from stellarium_core.config import Field, validate_params
from stellarium_core.errors import ConfigError
from stellarium_core.hookspecs import DeviceContext, hookimpl
from stellarium_core.photon import confined_paths
from stellarium_core.volumes.blockdev import BlockDevice
from stellarium_core.volumes.imagedisk import ImageDisks
from stellarium_core.volumes.volume import Volume, VolumeStore
from stellarium_virtio_stellar.device import VirtioStellar
from stellarium_virtio_stellar.sharing import shared, volume_chunks

if TYPE_CHECKING:
    from stellarium_core.host import Host
    from stellarium_core.volumes.imagedisk import ImageDisk

NAME = "virtio-stellar"


def _boolean(value: Any) -> bool:
    """``--device`` values arrive as strings; host configs give real booleans."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"must be true or false, got {value!r}", key="readonly")


def _catalogs(host: Host) -> tuple[VolumeStore, ImageDisks]:
    return VolumeStore.for_host(host), ImageDisks.for_host(host)


def open_device(host: Host, volume: str, *, readonly: bool = False) -> VirtioStellar:
    """A device over ``volume`` in ``host``'s store.

    A writable device holds the volume's writer lock; its writes are flushed when
    the guest sends FLUSH and when the VMM closes the device.
    """
    vols, disks = _catalogs(host)
    vol = vols.open(volume, readonly=readonly)
    return _device(vol, volume, host, writes=not readonly,
                   sharing=lambda: shared(volume_chunks(vol), vols, disks, volume=volume))


def open_image_device(host: Host, image: str) -> VirtioStellar:
    """A read-only device over the VM form of ``image`` (a name or digest) in ``host``'s store.

    The image machinery is imported here, not with the plugin: a VMM booting from a
    volume does not pay for it at start-up."""
    from stellarium_core.distribution import ImageStore
    from stellarium_core.distribution.vmdisk import vm_disk

    vols, disks = _catalogs(host)
    res = vm_disk(ImageStore.for_host(host), disks, image)
    disk = disks.open(res.image, image)
    return _device(disk, image, host, writes=False,
                   sharing=lambda: shared(disk.disk.digests(), vols, disks, image=res.image))


def _device(vol: Volume | ImageDisk, serial: str, host: Host, *, writes: bool,
            sharing: Callable[[], dict[str, int]]) -> VirtioStellar:
    try:
        disk = BlockDevice(vol)
    except BaseException:
        vol.close()
        raise
    return VirtioStellar(disk, serial=serial, on_close=vol.close,
                         host_paths=[(str(host.store_path), writes),
                                     *confined_paths(host.config, writes=writes)],
                         sharing=sharing)


@hookimpl
def stellarium_device(name: str, params: dict[str, Any],
                      context: DeviceContext) -> VirtioStellar | None:
    if name != NAME:
        return None
    p = validate_params(params, {
        "volume": Field(str, None, doc="volume name in the host's store"),
        "image": Field(str, None, doc="image whose VM form (read-only EROFS) to serve"),
        "readonly": Field(object, None, doc="serve the volume read-only"),
    })
    if (p["volume"] is None) == (p["image"] is None):
        raise ConfigError("give exactly one of volume=NAME or image=NAME", key="volume")
    if p["image"] is not None:
        if p["readonly"] is not None and not _boolean(p["readonly"]):
            raise ConfigError("an image's VM disk is always read-only", key="readonly")
        return open_image_device(context.host, p["image"])
    return open_device(context.host, p["volume"], readonly=_boolean(p["readonly"] or False))
