"""The ``zstd`` compressor: about 25% smaller chunks than lz4 on a Debian rootfs, at
about twice lz4's CPU time to compress (decompression stays fast).

Built on ``zstandard`` (the maintained binding of the reference C library, which
releases the GIL while it works). Its compressor and decompressor objects are
not thread-safe, so each thread gets its own.

A frame declares its content size, and the library allocates what it declares.
A chunk record already says how large the chunk is, so a frame that declares
anything else is refused before decompressing (a lying frame cannot make the
store allocate gigabytes), and the output is bounded by the record's size.
"""

from __future__ import annotations

import threading
from typing import Any

import zstandard

from stellarium_core.config import Field, validate_params
from stellarium_core.hookspecs import hookimpl

LEVELS = (-7, 22)


class ZstdCompressor:
    """zstd frames at ``level`` (default 3), content size written, no checksum
    (the store hashes every chunk it reads)."""

    name = "zstd"

    def __init__(self, params: dict[str, Any]) -> None:
        low, high = LEVELS
        self._params = validate_params(params, {"level": Field(int, 3, lambda v: None if (
            low <= v <= high and v != 0) else f"must be {low}..-1 or 1..{high}, got {v}")})
        self._local = threading.local()

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._params)

    def _tools(self) -> tuple[Any, Any]:
        tools = getattr(self._local, "tools", None)
        if tools is None:
            tools = self._local.tools = (
                zstandard.ZstdCompressor(level=self._params["level"], write_checksum=False),
                zstandard.ZstdDecompressor())
        return tools

    def compress(self, data: bytes | memoryview) -> bytes:
        return self._tools()[0].compress(data)

    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        try:
            declared = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise ValueError(f"not a zstd frame ({exc})") from None
        if declared not in (size, -1):
            raise ValueError(f"the zstd frame declares {declared} bytes, the chunk "
                             f"record {size}")
        try:
            out = self._tools()[1].decompress(data, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise ValueError(f"zstd: {exc}") from None
        if len(out) != size:
            raise ValueError(f"the zstd frame holds {len(out)} bytes, the chunk record {size}")
        return out


@hookimpl
def stellarium_compressor(name: str, params: dict[str, Any]) -> Any:
    return ZstdCompressor(params) if name == "zstd" else None
