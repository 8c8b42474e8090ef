"""Volt's artifact cache: built kernels, initramfs images and lab inputs.

Everything here is derived from inputs named in its key, so deleting the cache
only costs rebuild time. ``$VOLT_CACHE`` moves it (default ``~/.cache/volt``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def root() -> Path:
    """The cache root, created on first use."""
    path = Path(os.environ.get("VOLT_CACHE", "~/.cache/volt")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def key(*inputs: Any) -> str:
    """A short stable digest of JSON-serialisable inputs."""
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextmanager
def locked(path: Path) -> Iterator[Path]:
    """Hold an exclusive lock beside ``path`` so parallel builders of it take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield path
