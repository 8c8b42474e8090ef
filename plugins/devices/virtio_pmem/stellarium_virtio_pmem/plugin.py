"""The ``virtio-pmem`` device plugin: ``volt run --device virtio-pmem,volume=NAME``.

The volume, a fixed grid of chunks in the host's store, becomes a read-only window
composed of mmaps of the packs that hold its chunks (see
:mod:`stellarium_core.nebula.compose`). Slots never written map the zero page.
Chunks stored compressed get a mappable copy in the store the first time any VM maps
them, so every later VM on the host maps the same pages: N guests reading one base
share one copy of it in the host's page cache. The window is a snapshot of the
volume when the VM starts: the leases keep its chunks in place, so deleting or
rewriting the volume meanwhile changes nothing a running guest sees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stellarium_core.config import Field, validate_params
from stellarium_core.errors import ConfigError, StellarError
from stellarium_core.hookspecs import DeviceContext, hookimpl
from stellarium_core.nebula.compose import Composition, compose, materialise
from stellarium_core.nebula.format import align
from stellarium_core.nebula.table import PAGE
from stellarium_core.volumes.volume import VolumeStore
from stellarium_virtio_pmem.device import VirtioPmem

if TYPE_CHECKING:
    from stellarium_core.host import Host

NAME = "virtio-pmem"
#: The window is a whole number of these: Linux adds device memory in 2 MiB subsections.
WINDOW_ALIGN = 2 << 20


def map_volume(host: Host, volume: str) -> Composition:
    """``volume`` of ``host``'s store as a read-only window of mapped chunks."""
    with VolumeStore.for_host(host).open(volume, readonly=True) as vol:
        grid = vol.chunk_size
        if grid % PAGE:
            raise StellarError(f"volume {volume!r} has {grid}-byte chunks; mapping needs "
                               f"a multiple of the {PAGE}-byte page")
        slots = vol.chunk_slots()
        size = align(max(vol.size, 1), WINDOW_ALIGN)
    try:
        materialise(host.store, slots.values())
    except OSError as exc:
        raise StellarError(f"volume {volume!r}: cannot store mappable copies of its "
                           f"compressed chunks in {host.store_path}: {exc.strerror} (import "
                           "it with `stellar vol import --mappable`, or run once with "
                           "write access to the store)") from None
    return compose(host.store, [(i * grid, d) for i, d in slots.items()], size)


@hookimpl
def stellarium_device(name: str, params: dict[str, Any],
                      context: DeviceContext) -> VirtioPmem | None:
    if name != NAME:
        return None
    p = validate_params(params, {
        "volume": Field(str, None, doc="volume in the host's store to map, read-only"),
    })
    if p["volume"] is None:
        raise ConfigError("give volume=NAME (the read-only base to map)", key="volume")
    return VirtioPmem(map_volume(context.host, p["volume"]))
