"""The core's default hasher, BLAKE3-256, published as the ``blake3`` plugin.

It lives in the core because chunk identity is part of the storage model; it is
still found through the ``stellarium.hashers`` entry point like any other hasher.
"""

from __future__ import annotations

from typing import Any

import blake3 as _blake3

from stellarium_core.config import Field, validate_params
from stellarium_core.hookspecs import hookimpl


class Blake3Hasher:
    """BLAKE3 with a 32-byte digest; multi-threaded hashing for large inputs."""

    name = "blake3"
    digest_size = 32

    def __init__(self, params: dict[str, Any]) -> None:
        self._params = validate_params(
            params, {"max_threads": Field(int, 1, lambda v: None if v >= 1 else "must be >= 1")}
        )
        self._threads = self._params["max_threads"]

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._params)

    def digest(self, data: bytes | memoryview) -> bytes:
        return _blake3.blake3(data, max_threads=self._threads).digest()

    def new(self) -> Any:
        return _blake3.blake3(max_threads=self._threads)


@hookimpl
def stellarium_hasher(name: str, params: dict[str, Any]) -> Blake3Hasher | None:
    return Blake3Hasher(params) if name == "blake3" else None
