"""Plugin discovery (entry points by namespace, read once) and registration (pluggy).

Installing a distribution that declares an entry point in one of
:data:`NAMESPACES` is all it takes to make a plugin available. Listing reads
package metadata only, so a broken plugin never breaks ``stellar plugins``;
loading imports exactly the plugin asked for and validates it against
:mod:`stellarium_core.hookspecs` before it is used.

Scanning every distribution's metadata costs a VMM more start-up time than
booting its devices, so what the scan found is cached (a small JSON file under
``$XDG_CACHE_HOME/stellarium``) keyed by the installed distributions: the
``*.dist-info`` / ``*.egg-info`` entries of every ``sys.path`` directory, with
their modification times. Installing, upgrading or removing a distribution
changes the key, so the next run scans again.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pluggy

from stellarium_core import hookspecs
from stellarium_core.errors import ConfigError, PluginError

# kind -> (entry-point namespace, factory hook name)
NAMESPACES: dict[str, tuple[str, str]] = {
    "hasher": ("stellarium.hashers", "stellarium_hasher"),
    "chunker": ("stellarium.chunkers", "stellarium_chunker"),
    "compressor": ("stellarium.compressors", "stellarium_compressor"),
    "tier": ("stellarium.tiers", "stellarium_tier"),
    "device": ("stellarium.devices", "stellarium_device"),
    "runtime": ("stellarium.runtimes", "stellarium_runtime"),
}


@dataclass(frozen=True)
class PluginInfo:
    """One installed entry point, read from metadata without importing it."""

    kind: str
    namespace: str
    name: str
    distribution: str
    version: str
    target: str


def installed(kind: str | None = None) -> list[PluginInfo]:
    """Every installed plugin (of one kind, if given), sorted by namespace and name."""
    found = _discovered()
    return [p for p in found if kind is None or p.kind == kind]


_SCANNED: tuple[str, list[PluginInfo]] | None = None


def _discovered() -> list[PluginInfo]:
    """Every plugin of every kind: this process's copy, else the cache, else a scan."""
    global _SCANNED
    where, key = _distributions_key()
    if _SCANNED is not None and _SCANNED[0] == key:
        return _SCANNED[1]
    cache = _cache_dir()
    path = cache / f"entry-points-{where}.json" if cache is not None else None
    try:
        if path is None:
            raise FileNotFoundError("no cache directory")
        saved = json.loads(path.read_text())
        if saved["key"] != key:
            raise ValueError("the installed distributions changed")
        found = [PluginInfo(**p) for p in saved["plugins"]]
    except (OSError, ValueError, TypeError, KeyError):
        found = _scan()
        if path is not None:
            _save(path, key, found)
    _SCANNED = (key, found)
    return found


def _distributions_key() -> tuple[str, str]:
    """(digest of this interpreter and its ``sys.path``: one cache file per environment,
    digest of which distributions are installed there: names, versions, mtimes)."""
    import blake3  # already loaded by any host's hasher; hashlib would pull in OpenSSL

    where = blake3.blake3(sys.version.encode())
    h = blake3.blake3()
    for entry in sys.path:
        where.update(b"\0" + entry.encode(errors="surrogateescape"))
        try:
            with os.scandir(entry or ".") as it:
                dists = sorted((e.name, e.stat().st_mtime_ns) for e in it
                               if e.name.endswith((".dist-info", ".egg-info")))
        except OSError:
            continue
        for name, mtime in dists:
            h.update(f"{entry}/{name}:{mtime}\0".encode(errors="surrogateescape"))
    return where.hexdigest()[:24], h.hexdigest()


def _cache_dir() -> Path | None:
    """``$XDG_CACHE_HOME/stellarium`` or ``$HOME/.cache/stellarium``; None without either
    (a jailed VMM's environment is empty: it scans)."""
    base = os.environ.get("XDG_CACHE_HOME") or (
        os.path.join(os.environ["HOME"], ".cache") if os.environ.get("HOME") else None)
    return Path(base) / "stellarium" if base else None


def _scan() -> list[PluginInfo]:
    import importlib.metadata as metadata

    found = []
    for k, (namespace, _hook) in NAMESPACES.items():
        for ep in metadata.entry_points(group=namespace):
            dist = ep.dist
            found.append(PluginInfo(k, namespace, ep.name, dist.name if dist else "?",
                                    dist.version if dist else "?", ep.value))
    return sorted(set(found), key=lambda p: (p.namespace, p.name, p.distribution))


def _save(path: Path, key: str, found: list[PluginInfo]) -> None:
    """Best effort: a cache that cannot be written (read-only home, a jail) costs a scan."""
    from stellarium_core.fsutil import write_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"key": key, "plugins": [asdict(p) for p in found]}
        write_atomic(path, json.dumps(data).encode(), durable=False)
    except OSError:
        pass


def _load_target(target: str) -> Any:
    """Import an entry point's ``module`` or ``module:attr`` (what EntryPoint.load does)."""
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module.strip())
    for part in filter(None, attr.strip().split(".")):
        obj = getattr(obj, part)
    return obj


def _distribution_of(kind: str, name: str) -> str:
    for info in installed(kind):
        if info.name == name:
            return f"{info.distribution} {info.version}"
    return "an unknown distribution"


class Registry:
    """Loads plugins by kind and name and holds them in one pluggy PluginManager."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs.Specs)
        self._loaded: dict[tuple[str, str], Any] = {}

    @property
    def hook(self) -> Any:
        """The hook relay, for broadcasting lifecycle events."""
        return self.pm.hook

    def load(self, kind: str, name: str) -> Any:
        """Import the plugin ``name`` of ``kind``, validate it, and register it."""
        if kind not in NAMESPACES:
            raise PluginError(f"unknown plugin kind {kind!r}; kinds are {', '.join(NAMESPACES)}")
        key = (kind, name)
        if key in self._loaded:
            return self._loaded[key]
        namespace, hook_name = NAMESPACES[kind]
        found: dict[str, PluginInfo] = {}  # one metadata scan serves every message below
        for info in installed(kind):
            found.setdefault(info.name, info)
        if name not in found:
            have = ", ".join(sorted(found)) or "none"
            raise PluginError(
                f"no {kind} plugin named {name!r} is installed "
                f"(installed in {namespace}: {have})"
            )
        info = found[name]
        origin = f"{kind} plugin {name!r} from {info.distribution} {info.version}"
        try:
            plugin = _load_target(info.target)
        except Exception as exc:  # whatever a broken plugin raises while importing
            raise PluginError(f"{origin} failed to load: {type(exc).__name__}: {exc}") from exc
        self._register(f"{kind}:{name}", origin, plugin, hook_name)
        self._loaded[key] = plugin
        return plugin

    def _register(self, reg_name: str, origin: str, plugin: Any, hook_name: str) -> None:
        if not self.pm.is_registered(plugin):
            try:
                self.pm.register(plugin, name=reg_name)
                self.pm.check_pending()
            except pluggy.PluginValidationError as exc:
                if self.pm.is_registered(plugin):
                    self.pm.unregister(plugin)
                raise PluginError(f"{origin} breaks its contract: {exc}") from exc
        impls = self.pm.hook.__dict__[hook_name].get_hookimpls()
        if not any(impl.plugin is plugin for impl in impls):
            raise PluginError(f"{origin} breaks its contract: it implements no {hook_name} hook")

    def create(
        self, kind: str, name: str, params: dict[str, Any] | None = None, **extra: Any
    ) -> Any:
        """Load plugin ``name`` and return the product its factory hook makes.

        ``ConfigError``s about parameters come back with the key prefixed by
        ``params.`` so the caller can place them in the config file.
        """
        plugin = self.load(kind, name)
        hook_name = NAMESPACES[kind][1]
        caller = self.pm.subset_hook_caller(
            hook_name, [p for p in self.pm.get_plugins() if p is not plugin]
        )
        try:
            product = caller(name=name, params=dict(params or {}), **extra)
        except ConfigError as exc:
            key = f"params.{exc.key}" if exc.key else "params"
            raise ConfigError(exc.reason, key=key) from exc
        if product is None:
            raise PluginError(
                f"{kind} plugin {name!r} from {_distribution_of(kind, name)} "
                f"returned nothing from {hook_name}(name={name!r})"
            )
        return product
