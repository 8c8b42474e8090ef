"""pytest fixtures for tests that need real KVM (the lab), a guest kernel or an initramfs.

Installed as a pytest plugin (the ``pytest11`` entry point of stellarium-runtime-volt),
so any test, a device plugin's included, gets them without importing Volt. Tests
that use ``lab`` should carry ``@pytest.mark.lab``; they skip, saying why, when this
machine has no QEMU or no Debian kernel with kvm_amd.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from volt import lab as lab_mod
from volt.kernels import initramfs
from volt.kernels.build import KernelBuild
from volt.kernels.build import build as build_kernel


@cache
def _unavailable() -> str | None:
    return lab_mod.unavailable_reason()


class Lab:
    """What the ``lab`` fixture hands a test: ``run`` a command with real /dev/kvm."""

    def run(self, cmd: Sequence[str], **kw: Any) -> lab_mod.LabResult:
        """See :func:`volt.lab.run`."""
        return lab_mod.run(cmd, **kw)


@pytest.fixture
def lab() -> Lab:
    """A handle on the nested KVM lab; skips when the lab cannot run here."""
    if os.environ.get("VOLT_IN_LAB") == "1":
        pytest.skip("already inside the lab; nesting another lab guest would crawl")
    reason = _unavailable()
    if reason:
        pytest.skip(f"nested KVM lab unavailable: {reason}")
    return Lab()


@pytest.fixture(scope="session")
def guest_kernel() -> KernelBuild:
    """Volt's minimal guest kernel (vmlinux + bzImage), built once and cached."""
    return build_kernel()


@pytest.fixture(scope="session")
def smoke_initramfs() -> Path:
    """A busybox initramfs whose /init prints ``VOLT-INIT-OK`` and reboots."""
    return initramfs.smoke_initramfs()


@pytest.fixture(scope="session")
def smoke_marker() -> str:
    """The line the smoke initramfs prints once userspace runs."""
    return initramfs.SMOKE_MARKER


@pytest.fixture(scope="session")
def busybox_initramfs() -> Callable[[str, Path], Path]:
    """``make(init_script, path)``: write a busybox initramfs whose /init is the script."""
    def make(init: str, path: Path) -> Path:
        return initramfs.base_archive(init).write(path)
    return make
