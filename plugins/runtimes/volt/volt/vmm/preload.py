"""What a pre-started VMM loads before it is asked for a VM: ``volt serve`` once for all
the children it forks, an idle ``volt run --api-sock`` for its own VM.

A fresh Python process spends most of its start-up importing (under the lab's nested
emulation, seconds of it); loaded ahead, none of that is on the way from a request to
the VM's first KVM_RUN.
"""

from __future__ import annotations

import importlib

#: What a VM imports on its way to the first KVM_RUN, booted or restored.
MODULES = ("volt.vmm.__main__", "volt.vmm.builder", "volt.vmm.runner", "volt.vmm.vm",
           "volt.vmm.devices.console", "volt.vmm.loader.kernel", "volt.jail.confine",
           "volt.jail.landlock", "volt.jail.caps", "stellarium_core.host",
           "stellarium_core.nebula", "stellarium_core.hashing", "stellarium_core.photon.shm",
           # a restore's (PUT /snapshot/load, volt run --snapshot NAME)
           "volt.snapshot.machine", "volt.snapshot.catalog", "stellarium_core.nebula.compose")


def modules() -> None:
    """Import :data:`MODULES` and what confinement loads (its modules, libseccomp)."""
    from volt.jail import confine, seccomp

    for name in (*MODULES, *confine.PRELOAD):
        importlib.import_module(name)
    seccomp._pyseccomp()
