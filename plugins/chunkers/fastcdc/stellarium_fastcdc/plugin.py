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

#: Bounds on chunk sizes, so a config that passes `host init` cannot make an ingest
#: exhaust memory or run for hours (see the reasons below).
MIN_CHUNK = 1 << 10
MIN_AVG = 4 << 10
MAX_CHUNK = 8 << 20
_TOO_SMALL = ("NEBULA gives every chunk its own record and index entry (128 bytes), so "
              "smaller chunks multiply disk use and ingest time")
_TOO_BIG = ("a chunk must fit NEBULA's 16 MiB chunk limit, and streams are read in windows "
            "of four times the largest chunk")


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
        if not p["min_size"] <= p["avg_size"] <= p["max_size"]:
            raise ConfigError(
                f"need min_size <= avg_size <= max_size, got "
                f"{p['min_size']}/{p['avg_size']}/{p['max_size']}", key="min_size")
        if p["min_size"] < MIN_CHUNK:
            raise ConfigError(f"must be at least {MIN_CHUNK} (1 KiB), got {p['min_size']}: "
                              f"{_TOO_SMALL}", key="min_size")
        if p["avg_size"] < MIN_AVG:
            raise ConfigError(f"must be at least {MIN_AVG} (4 KiB), got {p['avg_size']}: "
                              f"{_TOO_SMALL}", key="avg_size")
        if p["max_size"] > MAX_CHUNK:
            raise ConfigError(f"must be at most {MAX_CHUNK} (8 MiB), got {p['max_size']}: "
                              f"{_TOO_BIG}", key="max_size")
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
        size = self.max_size = self._params["size"]
        if not MIN_AVG <= size <= MAX_CHUNK:
            raise ConfigError(f"must be 4 KiB..8 MiB, got {size}: "
                              f"{_TOO_SMALL if size < MIN_AVG else _TOO_BIG}", key="size")

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
