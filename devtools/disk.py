"""Disk usage as benchmarks report it: blocks actually allocated, not apparent sizes."""

from __future__ import annotations

import os
from pathlib import Path


def allocated(*paths: Path) -> int:
    """Bytes allocated on disk (st_blocks * 512) by files and trees; links not followed.

    Sparse files and holes count as what they really take, which is the point
    when comparing manifests and packs against qcow2, casync or borg stores.
    """
    total = 0
    for path in paths:
        if not path.is_dir():
            total += os.lstat(path).st_blocks * 512
            continue
        for dirpath, _, files in os.walk(path):
            for f in files:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total
