"""The ``fastcdc`` and ``fixed`` chunkers.

FastCDC cuts files and streams (layers, kernels, memory snapshots) where the
content says, so an insertion shifts only nearby boundaries. ``fixed`` cuts a
regular grid, which block volumes need so an offset maps to a chunk index.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from stellarium_core.config import Field, validate_params
from stellarium_core.errors import ConfigError, PluginError
from stellarium_core.hookspecs import hookimpl


def _compiled_fastcdc() -> Any:
    """The compiled FastCDC kernel; the pure-Python fallback is ~100x slower."""
    try:
        from fastcdc.fastcdc_cy import fastcdc_cy
    except ImportError as exc:
        raise PluginError(
            "the fastcdc package has no compiled backend (fastcdc.fastcdc_cy failed to "
            f"import: {exc}); reinstall it from a wheel for this Python"
        ) from exc
    return fastcdc_cy


def _power_of_two(v: int) -> str | None:
    return None if v > 0 and v & (v - 1) == 0 else f"must be a power of two, got {v}"


class FastCDCChunker:
    """Content-defined chunks between ``min_size`` and ``max_size`` bytes."""

    name = "fastcdc"

    def __init__(self, params: dict[str, Any]) -> None:
        p = validate_params(params, {
            "min_size": Field("size", 16 * 1024),
            "avg_size": Field("size", 64 * 1024, _power_of_two),
            "max_size": Field("size", 256 * 1024),
        })
        if not 64 <= p["min_size"] <= p["avg_size"] <= p["max_size"]:
            raise ConfigError(
                f"need 64 <= min_size <= avg_size <= max_size, got "
                f"{p['min_size']}/{p['avg_size']}/{p['max_size']}", key="min_size")
        if p["max_size"] < 1024 or p["avg_size"] < 256:
            raise ConfigError("max_size must be >= 1024 and avg_size >= 256", key="max_size")
        self._params = p
        self.max_size = p["max_size"]
        self._cut = _compiled_fastcdc()

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._params)

    def cut(self, data: memoryview) -> Iterator[int]:
        p = self._params
        for chunk in self._cut(data, p["min_size"], p["avg_size"], p["max_size"]):
            yield chunk.length


class FixedChunker:
    """Equal ``size``-byte chunks (the last may be shorter), aligned to the data start."""

    name = "fixed"

    def __init__(self, params: dict[str, Any]) -> None:
        self._params = validate_params(params, {"size": Field("size", 64 * 1024, _power_of_two)})
        self.max_size = self._params["size"]

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._params)

    def cut(self, data: memoryview) -> Iterator[int]:
        size, total = self.max_size, len(data)
        for start in range(0, total, size):
            yield min(size, total - start)


@hookimpl
def stellarium_chunker(name: str, params: dict[str, Any]) -> Any:
    if name == "fastcdc":
        return FastCDCChunker(params)
    if name == "fixed":
        return FixedChunker(params)
    return None
