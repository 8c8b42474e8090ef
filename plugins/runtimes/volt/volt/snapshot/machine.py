"""A paused VM taken apart into a snapshot, and a new VM put together from one.

:func:`capture` runs in the VM's I/O thread with every vCPU parked, so neither the
guest nor a device changes anything while it reads: devices are quiesced and
saved, volumes snapshotted (TinyVol: a manifest copy, no data), the KVM state of
the VM and each vCPU read, and RAM stored as chunks. :func:`restore` builds a
machine whose RAM maps those chunks copy-on-write, with the same devices, and
puts every piece of state back before any vCPU runs; what does not fit (another
CPU model, another device set, a missing or corrupt chunk) is an error then.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from stellarium_core.errors import StellarError
from stellarium_core.virtio import StateError
from volt.snapshot import catalog, dirty, pages
from volt.snapshot.catalog import Snapshot
from volt.snapshot.manifest import KINDS, Manifest
from volt.vmm import exitcodes, persist
from volt.vmm.config import ConfigError, DeviceSpec, VmConfig
from volt.vmm.exitcodes import VoltError

if TYPE_CHECKING:
    from stellarium_core.host import Host
    from stellarium_core.nebula.batch import Batch
    from volt.vmm.vm import Machine

#: How long devices may take to finish the requests in flight.
QUIESCE_S = 10.0


def capture(machine: Machine, host: Host, name: str, cfg: VmConfig, *, kind: str = "Full",
            parent: Snapshot | None = None) -> Snapshot:
    """Snapshot the paused ``machine`` (configured as ``cfg``) as ``name``. A Diff
    re-reads only what changed since ``parent``, this VM's last snapshot (or the one it
    was restored from)."""
    if kind not in KINDS:
        raise VoltError(f"snapshot type must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind == "Diff" and parent is None:
        raise VoltError("a Diff snapshot needs an earlier snapshot of this VM (take a Full "
                        "one first, or restore from one)")
    catalog.check_name(name)
    made: dict[str, str] = {}

    def volumes() -> dict[str, str]:
        made.update(_snapshot_volumes(host, name, cfg))
        return made

    def fill(batch: Batch) -> tuple[Manifest, list[pages.Piece]]:
        kept: list[pages.Piece] = []
        diff = parent if kind == "Diff" else None
        m = describe(machine, cfg, lambda data: batch.put(data, mappable=True),
                     volumes=volumes, kept=kept,
                     parent=(diff.manifest.pieces, diff.digest) if diff else None)
        return m, kept

    machine.devices.quiesce(QUIESCE_S)
    try:
        snap = catalog.save(host, name, fill)
    except BaseException:
        drop_volumes(host, made.values())
        raise
    finally:
        machine.devices.resume()
    track_writes(machine)
    return snap


def track_writes(machine: Machine) -> None:
    """Count guest RAM writes from now: what the next Diff re-reads."""
    machine.log_dirty_pages()
    dirty.reset()


def describe(machine: Machine, cfg: VmConfig, put: Callable[[memoryview], bytes], *,
             volumes: Callable[[], dict[str, str]] = dict,
             parent: tuple[Sequence[pages.Piece], bytes] | None = None,
             kept: list[pages.Piece] | None = None) -> Manifest:
    """The paused, quiesced ``machine`` as a manifest, its RAM's pieces given to ``put``.

    ``volumes()`` snapshots the volumes once the devices flushed them. With ``parent``
    (pieces, and the manifest digest they come from, or b"" for none) only cells written
    since :func:`track_writes` are read again, the others' pieces go to ``kept``; with a
    digest it is a Diff of that snapshot."""
    devices = machine.devices.save()        # devices flush here: volumes come after
    assert machine.serial is not None and machine.i8042 is not None
    legacy = {"serial": machine.serial.save(), "i8042": machine.i8042.save()}
    msrs = persist.msr_indices(machine.kvm)
    vcpus = tuple(persist.save_vcpu(v.fd, msrs) for v in machine.vcpus)
    vm = persist.save_vm(machine.vm)
    vols = volumes()
    changed = dirty.cells(machine.mem, machine.dirty_pages()) if parent else None
    pieces = pages.save(machine.mem, put, parent=parent[0] if parent else (), dirty=changed,
                        kept=kept)
    diff = parent[1] if parent else b""
    return Manifest("Diff" if diff else "Full", _config(cfg),
                    persist.cpu_signature(vcpus[0]["cpuid"]), machine.mem.size, tuple(pieces),
                    vm, vcpus, devices, legacy, vols, diff or None)


def _config(cfg: VmConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k != "serial"}


def _snapshot_volumes(host: Host, name: str, cfg: VmConfig) -> dict[str, str]:
    """A read-only TinyVol snapshot of each writable volume (flushed when its device
    was saved)."""
    from stellarium_core.volumes.volume import VolumeStore

    out: dict[str, str] = {}
    vols = VolumeStore.for_host(host)
    try:
        for d in cfg.devices:
            vol = d.params.get("volume")
            if vol:
                out[d.id] = f"{name}.{d.id}.{uuid.uuid4().hex[:8]}"
                vols.snapshot(str(vol), out[d.id])
    except BaseException:
        drop_volumes(host, out.values())
        raise
    return out


def drop_volumes(host: Host, names: Iterable[str]) -> None:
    """Delete the volumes a failed snapshot or restore made."""
    from stellarium_core.volumes.volume import VolumeStore

    vols = VolumeStore.for_host(host)
    for v in names:
        if vols.exists(v):
            vols.delete(v)


def restored_config(host: Host, snap: Snapshot, instance: str) -> VmConfig:
    """The VM of ``snap``: its devices, each volume a fresh writable clone of the volume's
    snapshot (``<snapshot volume>.<instance>``), so clones keep their writes apart."""
    m = snap.manifest
    try:
        cfg = VmConfig(**m.config)
    except (ConfigError, TypeError) as exc:
        raise VoltError(f"snapshot {snap.name!r}: its VM configuration: {exc}",
                        exitcodes.SNAPSHOT) from None
    if set(m.volumes) - {d.id for d in cfg.devices}:
        raise VoltError(f"snapshot {snap.name!r}: volumes name devices it does not have",
                        exitcodes.SNAPSHOT)
    if cfg.memory_mib << 20 != m.memory_size:
        raise VoltError(f"snapshot {snap.name!r}: {m.memory_size} bytes of memory for a "
                        f"{cfg.memory_mib} MiB VM", exitcodes.SNAPSHOT)
    if not m.volumes:
        return cfg
    from stellarium_core.volumes.volume import VolumeStore

    vols = VolumeStore.for_host(host)
    devices, clones = [], []
    try:
        for d in cfg.devices:
            if d.id in m.volumes:
                clone = f"{m.volumes[d.id]}.{instance}"
                try:
                    vols.clone(m.volumes[d.id], clone)
                except StellarError as exc:
                    raise VoltError(f"snapshot {snap.name!r}: device {d.id}'s volume: {exc}",
                                    exitcodes.SNAPSHOT) from None
                clones.append(clone)
                d = DeviceSpec(d.plugin, {**d.params, "volume": clone}, d.id)
            devices.append(d)
    except BaseException:
        drop_volumes(host, clones)
        raise
    return replace(cfg, devices=tuple(devices))


def restore(machine_for: Callable[[Any], Machine], snap: Snapshot, host: Host) -> Machine:
    """A machine built by ``machine_for(memory)`` over ``snap``'s RAM (its chunks mapped
    copy-on-write), then given every piece of its saved state. Nothing runs yet."""
    from stellarium_core.nebula.compose import compose, materialise
    from stellarium_core.nebula.mapping import NotMappableError
    from volt.vmm.memory import GuestMemory

    m = snap.manifest
    chunks = [(p.offset, p.digest) for p in m.pieces]
    try:
        try:
            comp = compose(host.store, chunks, m.memory_size, private=True)
        except NotMappableError:
            # stored in another form (compressed, e.g. pulled): a mappable copy, once per
            # store, so no restore has to copy memory itself
            materialise(host.store, (d for _, d in chunks))
            comp = compose(host.store, chunks, m.memory_size, private=True)
    except StellarError as exc:
        raise VoltError(f"snapshot {snap.name!r}: its memory: {exc}",
                        exitcodes.SNAPSHOT) from None
    machine = machine_for(GuestMemory.mapped(comp.addr, m.memory_size, comp))
    if len(machine.vcpus) != len(m.vcpus):
        raise VoltError(f"snapshot {snap.name!r} has {len(m.vcpus)} vCPU states for "
                        f"{len(machine.vcpus)} vCPUs", exitcodes.SNAPSHOT)
    persist.check_cpu(machine.kvm, m.vcpus[0].get("cpuid", b""))
    persist.restore_vm(machine.vm, m.vm)   # the irqchip first: restored devices may interrupt
    for v, state in zip(machine.vcpus, m.vcpus, strict=True):
        persist.restore_vcpu(v.fd, state)
    assert machine.serial is not None and machine.i8042 is not None
    try:
        machine.serial.restore(m.legacy.get("serial"))
        machine.i8042.restore(m.legacy.get("i8042"))
        machine.devices.restore(m.devices)
    except StateError as exc:
        raise VoltError(f"snapshot {snap.name!r}: {exc}", exitcodes.SNAPSHOT) from None
    track_writes(machine)              # a Diff of this VM has the snapshot as its parent
    machine.boot_mode = "snapshot"
    return machine
