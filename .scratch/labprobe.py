"""Probe: boot the virtio-stellar guest in the lab with --seccomp=log, print audit lines."""
import shlex, subprocess, sys, tempfile
from pathlib import Path
sys.path.insert(0, "plugins/devices/virtio_stellar/tests")
import test_virtio_stellar_boot as t
from volt import lab
from volt.kernels.build import ensure_kernel  # noqa
from volt.kernels.initramfs import base_archive
from volt.lab.pytest_plugin import _guest_kernel if False else None  # noqa
