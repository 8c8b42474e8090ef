"""Build a microVM from a :class:`VmConfig`: everything between "configured" and "runnable".

Input errors that need no KVM (kernel and initrd, command line, devices) are found
before /dev/kvm is opened, so they report the same way on any machine. Then
:func:`build` creates the machine (KVM VM, memory; :func:`_add_devices`: legacy and
virtio devices) and boots Linux into it (:func:`_boot_linux`: kernel, initrd, boot
tables, vCPU registers). :func:`build_restored` creates the machine and adds its
devices the same way, then loads a snapshot's state instead of ``_boot_linux``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stellarium_core.errors import StellarError
from volt.vmm import cpu, exitcodes, kvm, timing
from volt.vmm.config import VmConfig
from volt.vmm.devices import manager
from volt.vmm.devices.console import open_sink
from volt.vmm.exitcodes import VoltError
from volt.vmm.loader import bootparams, mptable
from volt.vmm.loader import kernel as kernel_loader
from volt.vmm.vm import Machine

if TYPE_CHECKING:
    from stellarium_core.host import Host
    from volt.snapshot.catalog import Snapshot

#: Which registry image a boot mode wants, best first.
KERNEL_SLOTS = {"auto": ("bzImage", "vmlinux"), "linux64": ("bzImage", "vmlinux"),
                "pvh": ("vmlinux",)}


@dataclass
class BootSource:
    """A checked kernel (not yet loaded), its initrd and the final command line."""

    kernel: kernel_loader.KernelImage
    initrd: bytes | None
    cmdline: bytes
    #: Chunks to read before the vCPUs start (a boot manifest's prefetch set).
    prefetch: tuple[bytes, ...] = ()


def build(cfg: VmConfig, host: Host, *,
          console: Callable[[bytes], None] | None = None) -> Machine:
    """Check the inputs, then create the VM, load the kernel and configure the vCPUs.

    ``host`` gives kernels and initrds named in the registry, and the device plugins
    their creation context. ``console`` replaces the sink ``cfg.serial`` names. On
    failure everything made so far is released (devices closed, fds and memory freed).
    """
    boot = boot_source(cfg, host)
    devices: list[tuple[Any, Any]] = []
    machine = None
    try:
        devices = manager.create_devices(cfg.devices, host)
        timing.mark("devices")
        if boot.prefetch:
            _prefetch(host, boot.prefetch)
            timing.mark("prefetch")
        machine = Machine(cfg.memory_mib << 20, cfg.vcpus, hugepages=cfg.hugepages,
                          ksm=cfg.ksm)
        _add_devices(machine, devices, console or open_sink(cfg.serial))
        _boot_linux(machine, cfg, boot)
        timing.mark("build")
    except BaseException:
        boot.kernel.file.close()
        attached = machine.devices.transports if machine is not None else {}
        manager.close_devices(dev for spec, dev in devices if spec.id not in attached)
        if machine is not None:
            machine.close()
        raise
    return machine


def build_restored(snap: Snapshot, cfg: VmConfig, host: Host, *,
                   console: Callable[[bytes], None] | None = None) -> Machine:
    """The VM of snapshot ``snap`` (configured as ``cfg``: :func:`restored_config`), its
    RAM mapped from the snapshot's chunks, every state restored; nothing runs yet. On
    failure everything made so far is released."""
    from volt.snapshot.machine import restore

    devices: list[tuple[Any, Any]] = []
    made: list[Machine] = []

    def machine_for(memory: Any) -> Machine:
        made.append(Machine(cfg.memory_mib << 20, cfg.vcpus, memory=memory))
        _add_devices(made[0], devices, console or open_sink(cfg.serial))
        return made[0]

    try:
        devices = manager.create_devices(cfg.devices, host)
        timing.mark("devices")
        machine = restore(machine_for, snap, host)
        timing.mark("build")
    except BaseException:
        attached = made[0].devices.transports if made else {}
        manager.close_devices(dev for spec, dev in devices if spec.id not in attached)
        if made:
            made[0].close()
        raise
    return machine


def boot_source(cfg: VmConfig, host: Host) -> BootSource:
    """The kernel, initrd and command line ``cfg`` asks for, each checked."""
    if not cfg.kernel:
        raise VoltError("no kernel: give --kernel PATH|NAME or set kernel in the host "
                        "config's [vm] table", exitcodes.KERNEL)
    manifest = _manifest(host, cfg.manifest) if cfg.manifest else None
    blobs = {} if manifest is None else {
        b.digest: b for b in (manifest.kernel, manifest.initrd) if b is not None}
    if cfg.kernel in blobs:
        image = kernel_loader.kernel_from_bytes(
            f"kernel {cfg.kernel[:16]}", _read_blob(host, blobs[cfg.kernel], "kernel",
                                                     exitcodes.KERNEL))
    elif _is_path(cfg.kernel):
        image = kernel_loader.open_kernel(cfg.kernel)
    else:
        label, data = _from_registry(host, cfg.kernel, KERNEL_SLOTS[cfg.boot], "kernel",
                                     exitcodes.KERNEL)
        image = kernel_loader.kernel_from_bytes(label, data)
    initrd = None
    if cfg.initrd:
        if cfg.initrd in blobs:
            initrd = _read_blob(host, blobs[cfg.initrd], "initrd", exitcodes.INITRD)
        elif _is_path(cfg.initrd):
            initrd = bootparams.read_initrd(cfg.initrd)
        else:
            initrd = _from_registry(host, cfg.initrd, ("initrd",), "initrd",
                                    exitcodes.INITRD)[1]
    try:
        raw = bootparams.check_cmdline(cfg.cmdline + cfg.root_cmdline()
                                       + manager.cmdline(len(cfg.devices)), image.cmdline_limit)
    except VoltError:
        image.file.close()
        raise
    return BootSource(image, initrd, raw, manifest.prefetch if manifest else ())


def _manifest(host: Host, ref: str) -> Any:
    """The boot manifest ``ref`` names, verified, with every chunk and its root present."""
    from stellarium_core import boot

    try:
        return boot.load(host, ref).manifest
    except StellarError as exc:
        raise VoltError(f"boot manifest {ref[:16]}: {exc}", exitcodes.USAGE) from None


def _read_blob(host: Host, blob: Any, what: str, code: int) -> bytes:
    from stellarium_core import boot

    try:
        return boot.read_blob(host, blob, what)
    except StellarError as exc:
        raise VoltError(f"{what} from the boot manifest: {exc}", code) from None


def _prefetch(host: Host, digests: tuple[bytes, ...]) -> None:
    """Read the prefetch set through the host's PHOTON router, so each chunk is verified
    and hot before the guest asks for it. The worker threads are joined before the
    process confines itself (that needs a single thread)."""
    try:
        host.photon.prefetch(digests)
    except StellarError as exc:
        raise VoltError(f"prefetch: {exc}", exitcodes.DEVICE) from None


def _is_path(ref: str) -> bool:
    """A path when it names a file or has a slash; otherwise a registry name or digest."""
    return "/" in ref or os.path.exists(ref)


def _from_registry(host: Host, ref: str, slots: tuple[str, ...], what: str,
                   code: int) -> tuple[str, bytes]:
    """(label, verified bytes) of the registry image ``ref`` names; errors get ``code``."""
    from volt.kernels import registry

    try:
        rec, slot = registry.select(host, ref, slots)
        return f"{rec.name} ({slot})", registry.read_image(host, rec, slot)
    except StellarError as exc:
        raise VoltError(f"{what} {ref!r}: no such file, and the kernel registry says: {exc}",
                        code) from None


def _add_devices(machine: Machine, devices: list[tuple[Any, Any]],
                 sink: Callable[[bytes], None]) -> None:
    """The serial console, the i8042 and the virtio devices (a restored VM needs them too)."""
    machine.add_legacy_devices(sink)
    for spec, dev in devices:
        machine.devices.attach(spec.id, dev)


def _boot_linux(machine: Machine, cfg: VmConfig, boot: BootSource) -> None:
    """Load kernel and initrd, write the boot tables, set up every vCPU for Linux."""
    mem = machine.mem
    loaded = kernel_loader.load(boot.kernel, mem)
    initrd = None
    if boot.initrd is not None:
        addr = bootparams.place_initrd(mem, boot.initrd, loaded.end,
                                       boot.kernel.initrd_addr_max)
        initrd = (addr, len(boot.initrd))
    mptable.write(mem, cfg.vcpus)
    if cfg.boot == "pvh" and loaded.pvh_entry is None:
        raise VoltError(f"{boot.kernel.path}: --boot pvh needs a vmlinux with a PVH note",
                        exitcodes.KERNEL)
    use_pvh = cfg.boot == "pvh" or (cfg.boot == "auto" and loaded.pvh_entry is not None
                                    and loaded.setup_header is None)
    supported = machine.kvm.supported_cpuid()
    try:
        tsc_khz = machine.vcpus[0].fd.get_tsc_khz()
    except kvm.KvmError:
        tsc_khz = None
    deadline = bool(machine.kvm.check_extension(kvm.CAP_TSC_DEADLINE_TIMER))
    for i, v in enumerate(machine.vcpus):
        cpu.configure_vcpu(v.fd, cpu.normalize_cpuid(supported, i, cfg.vcpus, tsc_khz,
                                                     deadline))
    boot_fd = machine.vcpus[0].fd
    if use_pvh:
        info = bootparams.write_pvh_start_info(mem, boot.cmdline, initrd)
        cpu.setup_pvh(boot_fd, mem, loaded.pvh_entry or 0, info)
    else:
        bootparams.write_zero_page(mem, loaded, boot.cmdline, initrd)
        cpu.setup_long_mode(boot_fd, mem, loaded.entry)
    machine.boot_mode = "pvh" if use_pvh else "linux64"
