"""Volt's side of boot manifests: recording one from the kernel registry (and a traced
first boot), and turning ``volt run --boot NAME`` into VmConfig layers.

The manifest format and its catalog are the core's (:mod:`stellarium_core.boot`);
here is what needs Volt: kernels by registry name, the VMM to trace, and the
VmConfig schema.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stellarium_core import boot
from stellarium_core.boot.manifest import parse_digest
from stellarium_core.errors import StellarError, UsageError
from volt.vmm import config as vm_config
from volt.vmm import exitcodes
from volt.vmm.exitcodes import VoltError

if TYPE_CHECKING:
    from stellarium_core.host import Host

#: The longest a traced first boot may run before it is stopped.
TRACE_TIMEOUT = 900.0


def blob(host: Host, ref: str, slots: tuple[str, ...], what: str) -> boot.Blob:
    """A registry kernel or initrd as a manifest blob (digest, size, chunk list)."""
    from volt.kernels import registry

    try:
        rec, slot = registry.select(host, ref, slots)
    except StellarError as exc:
        raise UsageError(f"--{what} {ref}: {exc} (import files with `volt kernel import`)") \
            from None
    img = rec.images[slot]
    return boot.Blob(img["digest"], img["size"],
                     tuple((bytes.fromhex(d), n) for d, n in rec.chunks(slot)))


def read_trace(path: Path) -> tuple[bytes, ...]:
    """The chunk digests a ``volt run --trace-chunks`` file lists, in order."""
    lines = path.read_text().split()
    return tuple(dict.fromkeys(parse_digest(h, f"{path}:{i}") for i, h in enumerate(lines, 1)))


def record(host: Host, name: str, *, kernel: str, initrd: str | None, root_kind: str,
           root: str, cmdline: str, memory_mib: int, vcpus: int,
           prefetch: tuple[bytes, ...] = ()) -> boot.Recorded:
    """Record manifest ``name`` from registry kernel/initrd refs (the kernel image ``volt
    run`` would pick for them) and a root disk."""
    from volt.vmm.builder import KERNEL_SLOTS

    m = boot.BootManifest(
        kernel=blob(host, kernel, KERNEL_SLOTS["auto"], "kernel"),
        initrd=blob(host, initrd, ("initrd",), "initrd") if initrd else None,
        root_kind=root_kind, root=root, cmdline=cmdline, memory_mib=memory_mib, vcpus=vcpus,
        prefetch=prefetch)
    return boot.record(host, name, m)


def trace_boot(config: str | None, name: str, run_args: list[str],
               timeout: float = TRACE_TIMEOUT) -> tuple[bytes, ...]:
    """Boot manifest ``name`` in a ``volt run`` child until the guest powers off; the
    chunks its devices read, in first-access order."""
    with tempfile.TemporaryDirectory(prefix="volt-trace-") as tmp:
        trace = Path(tmp) / "chunks"
        cmd = [sys.executable, "-m", "volt.vmm", *(["--config", config] if config else []),
               "--boot", name, "--trace-chunks", str(trace), *run_args]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise StellarError(f"the traced boot of {name} did not power off within "
                               f"{timeout:.0f} s") from None
        if proc.returncode != 0:
            raise StellarError(f"the traced boot of {name} failed (volt run exit "
                               f"{proc.returncode}); the manifest keeps no prefetch set")
        return read_trace(trace)


def expand(host: Host, ref: str, flags: vm_config.Layer) -> tuple[vm_config.Layer,
                                                                   vm_config.Layer]:
    """``volt run --boot REF``: the manifest (checked against the store) as VmConfig layers."""
    try:
        rec = boot.load(host, ref)
    except boot.NoSuchManifest as exc:
        raise VoltError(f"--boot {ref}: not a boot protocol ({', '.join(vm_config.BOOT_MODES)}) "
                        f"and {exc}", exitcodes.USAGE) from None
    except StellarError as exc:
        raise VoltError(f"--boot {ref}: {exc}", exitcodes.USAGE) from None
    m = rec.manifest
    defaults: dict[str, Any] = {"memory_mib": m.memory_mib, "vcpus": m.vcpus}
    if m.cmdline:
        defaults["cmdline"] = m.cmdline
    return vm_config.manifest_layers(rec.digest.hex(), m.kernel.digest,
                                     m.initrd.digest if m.initrd else "",
                                     m.device_params(), defaults, flags)


@contextmanager
def chunk_trace(host: Host, path: str) -> Iterator[None]:
    """While it is open, the host's PHOTON router notes every chunk read; at the end the
    digests go to ``path``, one per line, in first-access order. The file is opened
    first, while the VMM may still create files."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as out:
        host.photon.trace = {}
        try:
            yield
        finally:
            out.write("".join(f"{d.hex()}\n" for d in host.photon.trace))
            host.photon.trace = None
