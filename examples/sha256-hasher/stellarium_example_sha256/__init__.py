"""An outside distribution adding a ``sha256`` hasher to Stellarium."""

import hashlib
from typing import Any

from stellarium_core.config import validate_params
from stellarium_core.hookspecs import hookimpl


class Sha256Hasher:
    """Satisfies :class:`stellarium_core.hookspecs.Hasher` with nothing but hashlib."""

    name = "sha256"
    digest_size = 32
    params: dict[str, Any] = {}

    def digest(self, data: bytes | memoryview) -> bytes:
        return hashlib.sha256(data).digest()

    def new(self) -> Any:
        return hashlib.sha256()


@hookimpl
def stellarium_hasher(name: str, params: dict[str, Any]) -> Sha256Hasher | None:
    """Answer for ``sha256`` only; other hasher plugins answer for their names."""
    if name != "sha256":
        return None
    validate_params(params, {})
    return Sha256Hasher()
