"""Plugin discovery (stevedore, by entry-point namespace) and registration (pluggy).

Installing a distribution that declares an entry point in one of
:data:`NAMESPACES` is all it takes to make a plugin available. Listing reads
package metadata only, so a broken plugin never breaks ``stellar plugins``;
loading imports exactly the plugin asked for and validates it against
:mod:`stellarium_core.hookspecs` before it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    import importlib.metadata as metadata  # here, not at import: the VMM's start-up pays

    kinds = [kind] if kind else list(NAMESPACES)
    found = []
    for k in kinds:
        namespace = NAMESPACES[k][0]
        for ep in metadata.entry_points(group=namespace):
            dist = ep.dist
            found.append(
                PluginInfo(
                    k,
                    namespace,
                    ep.name,
                    dist.name if dist else "?",
                    dist.version if dist else "?",
                    ep.value,
                )
            )
    return sorted(set(found), key=lambda p: (p.namespace, p.name, p.distribution))


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
        origin = f"{kind} plugin {name!r} from {found[name].distribution} {found[name].version}"

        def failed(_manager: Any, entrypoint: Any, exc: BaseException) -> None:
            raise PluginError(f"{origin} failed to load: {type(exc).__name__}: {exc}") from exc

        from stevedore import driver

        try:
            plugin = driver.DriverManager(
                namespace, name, on_load_failure_callback=failed
            ).driver
        except PluginError:
            raise
        except Exception as exc:  # stevedore wraps conflicts and similar
            raise PluginError(f"{kind} plugin {name!r}: {exc}") from exc
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
