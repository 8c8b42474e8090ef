"""The ``virtio-stellar`` device plugin: ``volt run --device virtio-stellar,volume=NAME``
or ``...,image=NAME``.

It opens the named volume from the host's store (``config`` or the default host
config lookup) and serves it to the guest as a standard virtio-blk disk, so an
unmodified Linux ``virtio_blk`` driver reads and writes Stellarium storage.
``image=NAME`` serves an image's VM form instead, a read-only EROFS disk over
the same chunks the container form uses (built on first use).
"""

from __future__ import annotations

import atexit
from typing import Any

from stellarium_core.config import Field, validate_params
from stellarium_core.distribution import ImageStore
from stellarium_core.distribution.vmdisk import vm_disk
from stellarium_core.errors import ConfigError
from stellarium_core.hookspecs import hookimpl
from stellarium_core.host import Host
from stellarium_core.volumes.blockdev import BlockDevice
from stellarium_core.volumes.imagedisk import ImageDisk, ImageDisks
from stellarium_core.volumes.volume import Volume, VolumeStore
from stellarium_virtio_stellar.device import VirtioStellar

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


def open_device(volume: str, *, readonly: bool = False,
                config: str | None = None) -> VirtioStellar:
    """A device over ``volume`` of the host configured by ``config``.

    A writable device holds the volume's writer lock; its writes are flushed
    when the guest sends FLUSH, and at interpreter exit.
    """
    host = Host.from_config(config)
    return _device(VolumeStore.for_host(host).open(volume, readonly=readonly), volume)


def open_image_device(image: str, *, config: str | None = None) -> VirtioStellar:
    """A read-only device over the VM form of ``image`` (a name or digest)."""
    host = Host.from_config(config)
    disks = ImageDisks.for_host(host)
    res = vm_disk(ImageStore.for_host(host), disks, image)
    return _device(disks.open(res.image, image), image)


def _device(vol: Volume | ImageDisk, serial: str) -> VirtioStellar:
    try:
        disk = BlockDevice(vol)
    except BaseException:
        vol.close()
        raise
    dev = VirtioStellar(disk, serial=serial, on_close=vol.close)
    atexit.register(dev.close)
    return dev


@hookimpl
def stellarium_device(name: str, params: dict[str, Any]) -> VirtioStellar | None:
    if name != NAME:
        return None
    p = validate_params(params, {
        "volume": Field(str, None, doc="volume name in the host's store"),
        "image": Field(str, None, doc="image whose VM form (read-only EROFS) to serve"),
        "readonly": Field(object, None, doc="serve the volume read-only"),
        "config": Field(str, None, doc="host config path (default: the usual lookup)"),
    })
    if (p["volume"] is None) == (p["image"] is None):
        raise ConfigError("give exactly one of volume=NAME or image=NAME", key="volume")
    if p["image"] is not None:
        if p["readonly"] is not None and not _boolean(p["readonly"]):
            raise ConfigError("an image's VM disk is always read-only", key="readonly")
        return open_image_device(p["image"], config=p["config"])
    return open_device(p["volume"], readonly=_boolean(p["readonly"] or False),
                       config=p["config"])
