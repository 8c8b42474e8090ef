"""What one VM may touch once it runs: the input to Landlock (and the jailer's root).

Everything else on the host is out of reach. The list is derived from the VM's
config and its built devices, never from the guest: kernel and initrd files
(read), what each device declares it still opens (``host_paths``: a Stellarium
device's store, read-write unless every device on it is read-only, and PHOTON's
hot tier and counters beside it), and the KVM/TUN/vhost device nodes that exist
on this host.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from stellarium_core.virtio import HostPathsDevice

#: Device nodes a VMM may open after setup (hotplug, vhost); only those present are granted.
DEVICE_NODES = ("/dev/kvm", "/dev/net/tun", "/dev/vhost-*")


@dataclass
class Policy:
    """Paths by kind of access: ``read`` (files or trees), ``write`` (trees), ``devices``."""

    read: list[str] = field(default_factory=list)
    write: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)

    def grants(self, read: int, write: int, device: int) -> Iterator[tuple[str, int]]:
        """(path, rights) for each entry, given what each kind means in rights."""
        for paths, rights in ((self.read, read), (self.write, write), (self.devices, device)):
            for p in dict.fromkeys(paths):
                yield p, rights

    @classmethod
    def for_vm(cls, kernel: str, initrd: str | None, devices: Iterable[object]) -> Policy:
        """The policy of a VM booting ``kernel``/``initrd`` with these built devices.

        Kernel and initrd are granted when they are files (a name from the kernel
        registry was read from NEBULA during the build); a path several devices
        declare is writable if any of them writes it.
        """
        pol = cls(read=[os.path.abspath(p) for p in (kernel, initrd) if p and os.path.isfile(p)])
        paths: dict[str, bool] = {}
        for dev in devices:
            if isinstance(dev, HostPathsDevice):
                for path, writable in dev.host_paths():
                    paths[path] = paths.get(path, False) or writable
        for path, writable in paths.items():
            (pol.write if writable else pol.read).append(path)
        pol.devices = [p for pattern in DEVICE_NODES for p in sorted(glob.glob(pattern))]
        return pol
