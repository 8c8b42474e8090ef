"""Volt test fixtures: the nested KVM lab, the guest kernel, the smoke initramfs."""

from volt.lab.pytest_plugin import guest_kernel, lab, smoke_initramfs  # noqa: F401
