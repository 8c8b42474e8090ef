"""A Stellarium host for lab tests: a host config with its store beside it, driven through
the real ``stellar`` CLI (a subprocess, as a user runs it), and the ext4 root disks the
guests boot from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def stellar(cfg: Path, *args: object, timeout: float = 300) -> str:
    """``stellar --config cfg ARGS``; its stdout (AssertionError with stderr on failure)."""
    r = subprocess.run([sys.executable, "-m", "stellarium_core", "--config", str(cfg),
                        *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout


def ext4_image(tree: Path, img: Path, size: str = "16M", *mkfs_args: str) -> Path:
    """An ext4 image holding ``tree`` (``mkfs.ext4 -d``; ``mkfs_args``, e.g. ``-b 4096``)."""
    subprocess.run(["mkfs.ext4", "-q", "-F", *mkfs_args, "-d", str(tree), str(img), size],
                   check=True, capture_output=True, timeout=60)
    return img


def host_with_volume(tmp: Path, name: str, img: Path, *import_args: str) -> Path:
    """The config of a new host under ``tmp`` whose store holds ``img`` as volume ``name``
    (``import_args``: e.g. ``--mappable``)."""
    cfg = tmp / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    stellar(cfg, "host", "init")
    stellar(cfg, "vol", "import", name, img, *import_args)
    return cfg
