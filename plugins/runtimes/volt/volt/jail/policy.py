"""What one VM may touch once it runs: the input to Landlock (and the jailer's root).

Everything else on the host is out of reach. The list is derived from the VM's
config, never from the guest: kernel and initrd (read), the Stellarium store of
each device's host config (read-write unless every device on it is read-only),
PHOTON's host-wide hot tier of that store (read: a VMM parses guest bytes, so it
uses chunks trusted processes verified but never places any) and its counters
(write), and the KVM/TUN/vhost device nodes that exist on this host.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

#: Device nodes a VMM may open after setup (hotplug, vhost); only those present are granted.
DEVICE_NODES = ("/dev/kvm", "/dev/net/tun", "/dev/vhost-*")
TRUE_WORDS = ("1", "true", "yes", "on")


def _owned(tree: str) -> bool:
    """Whether ``tree`` exists and all of it belongs to this uid: what a VMM without
    capabilities can write (for root, os.access would say yes to anything)."""
    paths = [os.path.join(top, f) for top, _d, files in os.walk(tree) for f in ["", *files]]
    try:
        return bool(paths) and all(os.lstat(p).st_uid == os.geteuid() for p in paths)
    except OSError:
        return False


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
    def for_vm(cls, kernel: str, initrd: str | None,
               devices: list[tuple[str, dict[str, Any]]]) -> Policy:
        """The policy of a VM booting ``kernel``/``initrd`` with these ``--device`` specs.

        Stellarium device plugins take the host config as ``config=`` (default: the
        usual lookup), ``readonly=``, and ``image=`` (an image's VM form, always
        read-only); the store of that config is granted when it exists (a device that
        does not use a store has none to be granted).
        """
        from stellarium_core import config
        from stellarium_core.photon import confined_paths

        pol = cls(read=[os.path.abspath(p) for p in (kernel, initrd) if p])
        stores: dict[str, bool] = {}
        photon: dict[str, tuple[Any, Any]] = {}
        for _name, params in devices:
            cfg = config.load(params.get("config"))
            store = str(cfg.store_path)
            if not os.path.isdir(store):
                continue
            writable = "image" not in params and \
                str(params.get("readonly", "")).strip().lower() not in TRUE_WORDS
            stores[store] = stores.get(store, False) or writable
            photon[store] = confined_paths(cfg)
        for store, writable in stores.items():
            (pol.write if writable else pol.read).append(store)
            hot, counters = photon[store]
            if hot is not None and os.path.isdir(hot):
                pol.read.append(str(hot))  # verified chunks to use, never to place
            if not writable and _owned(counters):
                pol.write.append(str(counters))  # the hit counters `stellar tiers` shows
        pol.devices = [p for pattern in DEVICE_NODES for p in sorted(glob.glob(pattern))]
        return pol
