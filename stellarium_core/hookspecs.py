"""The plugin contracts: what each kind of plugin provides, as pluggy hook specs.

A plugin distribution registers an object (usually a module) under one of the
entry-point namespaces in :mod:`stellarium_core.plugins`. That object carries
``@hookimpl`` functions named after the specs below. Factory hooks take the
plugin ``name`` the host config asked for and its ``params`` table; an
implementation returns ``None`` for names it does not own, so several plugins
of one kind can be loaded side by side. Event hooks are broadcast to every
loaded plugin and return nothing.

The Protocol classes say what a factory's product must offer. They are
structural: a plugin needs no base class from the core.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pluggy

from stellarium_core.errors import StellarError

if TYPE_CHECKING:
    from stellarium_core.host import Host

PROJECT = "stellarium"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- products -------------------------------------------------------------------


class HashState(Protocol):
    """An incremental hash, so data can be hashed while it streams past."""

    def update(self, data: bytes | memoryview) -> object: ...

    def digest(self) -> bytes: ...


@runtime_checkable
class Hasher(Protocol):
    """Content identity: the same bytes always give the same digest."""

    name: str
    digest_size: int

    def digest(self, data: bytes | memoryview) -> bytes: ...

    def new(self) -> HashState: ...

    @property
    def params(self) -> dict[str, Any]: ...


@runtime_checkable
class Chunker(Protocol):
    """Cuts bytes into chunks; the cut must depend only on content, not on reads.

    ``cut`` gets a buffer and yields chunk lengths that add up to its length,
    treating the buffer's end as the end of the data. A cut position may depend
    only on the bytes from the chunk's start up to ``max_size`` bytes later; the
    core's stream reader relies on that to chunk unbounded streams in windows.
    """

    name: str
    max_size: int

    def cut(self, data: memoryview) -> Iterator[int]: ...

    @property
    def params(self) -> dict[str, Any]: ...


@runtime_checkable
class Compressor(Protocol):
    """Compresses chunks for NEBULA; every chunk record names its compressor.

    ``name`` is written into the record of each chunk it compresses (at most 7
    ASCII bytes), so a store reads such a chunk only while a compressor of that
    name is installed; a store may hold chunks of several. ``compress`` and
    ``decompress`` must be safe to call from several threads at once (ingest
    compresses in parallel). ``decompress(data, size)`` returns exactly ``size``
    bytes or raises ValueError, and must never allocate much more than ``size``
    whatever ``data`` claims: the bytes come from disk and may be damaged.
    """

    name: str

    def compress(self, data: bytes | memoryview) -> bytes: ...

    def decompress(self, data: bytes | memoryview, size: int) -> bytes: ...

    @property
    def params(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TierUsage:
    """What a tier holds now, for placement decisions and ``stellar tiers``."""

    objects: int
    used_bytes: int
    capacity_bytes: int | None


class TierFull(StellarError):
    """A tier backend has no room for a chunk; the router must evict or go lower."""


class TierUnavailable(StellarError):
    """A tier backend cannot be reached now (network, service down); retry later."""


@runtime_checkable
class TierBackend(Protocol):
    """One storage level (memory, NVMe, object store) keyed by chunk digest.

    ``put`` must be durable in this tier when it returns: PHOTON drops a chunk
    from a higher tier only after a lower tier's ``put`` has returned. ``get``
    returns None for an absent key and need not verify content: the router
    checks the digest of whatever a tier below hot returns. A backend raises
    :class:`TierFull` when it cannot take a chunk and :class:`TierUnavailable`
    when its service is unreachable, so the router needs no backend's own
    exception types. ``delete`` of an absent key is not an error.
    """

    name: str

    def put(self, key: bytes, data: bytes | memoryview) -> None: ...

    def get(self, key: bytes) -> bytes | None: ...

    def contains(self, key: bytes) -> bool: ...

    def delete(self, key: bytes) -> None: ...

    def keys(self) -> Iterator[bytes]: ...

    def usage(self) -> TierUsage: ...

    def close(self) -> None: ...


@runtime_checkable
class Runtime(Protocol):
    """Something that runs workloads from the store: a VMM or a container runner.

    ``params`` are the effective parameters it was created with, defaults filled in.
    """

    name: str

    def run(self, spec: Mapping[str, Any]) -> int: ...

    @property
    def params(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TierContext:
    """Host facts a tier backend may need: where the store lives."""

    store_path: Path


@dataclass(frozen=True)
class DeviceContext:
    """What a device plugin gets from the VMM creating it: the host (store, config,
    plugins), the same one ``--config`` chose for the VMM itself."""

    host: Host


# -- factory hooks --------------------------------------------------------------


class Specs:
    """Hook specifications; pluggy validates every implementation against them."""

    @hookspec(firstresult=True)
    def stellarium_hasher(self, name: str, params: dict[str, Any]) -> Hasher | None:
        """Return the hasher called ``name`` configured by ``params``, else None.

        Raise :class:`stellarium_core.errors.ConfigError` with ``key`` set to the
        parameter's name when a parameter is unknown, mistyped or impossible.
        """

    @hookspec(firstresult=True)
    def stellarium_chunker(self, name: str, params: dict[str, Any]) -> Chunker | None:
        """Return the chunker called ``name`` configured by ``params``, else None.

        Parameter errors are reported as for :meth:`stellarium_hasher`.
        """

    @hookspec(firstresult=True)
    def stellarium_compressor(self, name: str, params: dict[str, Any]) -> Compressor | None:
        """Return the chunk compressor called ``name`` configured by ``params``, else None.

        Parameter errors are reported as for :meth:`stellarium_hasher`.
        """

    @hookspec(firstresult=True)
    def stellarium_tier(
        self, name: str, params: dict[str, Any], context: TierContext
    ) -> TierBackend | None:
        """Return a tier backend called ``name`` for this host, else None.

        The backend must not touch remote services until first used, so that
        reading the config stays cheap. Parameter errors as for the hasher.
        """

    @hookspec(firstresult=True)
    def stellarium_device(
        self, name: str, params: dict[str, Any], context: DeviceContext
    ) -> Any | None:
        """Return a virtio device model called ``name`` for this host, else None.

        The product satisfies :class:`stellarium_core.virtio.VirtioDevice`; it
        sees guest memory and queues only through that contract, never a VMM.
        Parameter errors as for the hasher.
        """

    @hookspec(firstresult=True)
    def stellarium_runtime(self, name: str, params: dict[str, Any]) -> Runtime | None:
        """Return the runtime called ``name`` (a VMM or container runner), else None."""

    # -- lifecycle events (broadcast, no result) ---------------------------------

    @hookspec
    def stellarium_chunk_stored(self, digest: bytes, size: int, new: bool) -> None:
        """A chunk was written (``new``) or referenced again (dedup hit)."""

    @hookspec
    def stellarium_volume_created(self, volume: str, size: int) -> None:
        """A volume manifest named ``volume`` of ``size`` bytes now exists."""

    @hookspec
    def stellarium_instance_started(
        self, runtime: str, instance: str, info: dict[str, Any]
    ) -> None:
        """A VM or container called ``instance`` started under ``runtime``."""

    @hookspec
    def stellarium_instance_stopped(self, runtime: str, instance: str, exit_code: int) -> None:
        """A VM or container ended with ``exit_code``."""
