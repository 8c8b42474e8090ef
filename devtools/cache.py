"""A cache directory for expensive artifacts, keyed by the inputs that made them.

CI and developers reuse a debootstrap tree or a built kernel as long as its
inputs are unchanged; a changed input gives a new key and a fresh build.
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

ROOT = Path(os.environ.get("STELLAR_DEV_CACHE", "~/.cache/stellarium-dev")).expanduser()


def key(*inputs: Any) -> str:
    """A short stable digest of JSON-serialisable inputs."""
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextmanager
def locked(name: str) -> Iterator[Path]:
    """Hold an exclusive lock for building the artifact ``name``; yield its path."""
    ROOT.mkdir(parents=True, exist_ok=True)
    with open(ROOT / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield ROOT / name
