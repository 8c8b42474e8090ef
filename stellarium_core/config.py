"""The host config file (TOML): schema, defaults, and precise errors.

Every problem is reported as one :class:`ConfigError` naming the file, the
dotted key and the reason, before anything is created. Plugin parameter tables
are passed through here and validated by the plugin itself with
:func:`validate_params`, so a typo in ``[chunker.params]`` is caught the same way;
the ``[vm]`` table is the VM runtime's (:data:`VM_RUNTIME`) defaults, checked by it.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stellarium_core.errors import ConfigError

ENV_VAR = "STELLAR_CONFIG"
DEFAULT_PATH = Path("~/.config/stellarium/host.toml")
DEFAULT_STORE = Path("~/.local/share/stellarium")
TIER_LEVELS = ("hot", "warm", "cold")

_REQUIRED = object()
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TIB": 1 << 40}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as ``"64KiB"`` or ``"2 GiB"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size such as 65536 or \"64KiB\", got {type(value).__name__}")
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"{value!r} is not a size (use a number with B, KiB, MiB, GiB or TiB)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


@dataclass(frozen=True)
class Field:
    """One config key: its type, its default, and an optional value check.

    ``check`` returns a reason string when the value is impossible, else None.
    ``kind`` is a type, or ``"size"`` for byte sizes given as int or string; ``"flag"``
    and ``"number"`` take a bool or an int either typed (TOML, JSON) or as the string
    a command line gives (``on``/``off``, ``true``/``false``, ``1``/``0``; ``4096``).
    """

    kind: Any
    default: Any = _REQUIRED
    check: Callable[[Any], str | None] | None = None
    doc: str = ""


def _type_name(kind: Any) -> str:
    return {str: "a string", bool: "true or false", int: "an integer", float: "a number",
            dict: "a table", list: "an array", "size": "a size",
            "flag": "on or off", "number": "an integer"}.get(kind, str(kind))


_FLAGS = {"1": True, "true": True, "yes": True, "on": True,
          "0": False, "false": False, "no": False, "off": False}


def _convert(value: Any, f: Field, key: str) -> Any:
    if f.kind == "flag":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _FLAGS:
            return _FLAGS[value.strip().lower()]
        raise ConfigError(f"expected on/off or true/false, got {value!r}", key=key)
    if f.kind == "number":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        raise ConfigError(f"expected an integer, got {value!r}", key=key)
    if f.kind == "size":
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ConfigError(str(exc), key=key) from None
    ok = isinstance(value, f.kind) and not (f.kind in (int, float) and isinstance(value, bool))
    if f.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(
            f"expected {_type_name(f.kind)}, got {type(value).__name__} {value!r}", key=key
        )
    return value


def validate_params(
    table: Mapping[str, Any], fields: Mapping[str, Field], prefix: str = ""
) -> dict[str, Any]:
    """Check ``table`` against ``fields``; return it with defaults filled in.

    Unknown keys, wrong types, missing required keys and failed checks raise
    :class:`ConfigError` with the dotted key. Plugins call this on their params.
    """
    out: dict[str, Any] = {}
    for key in table:
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise ConfigError(f"unknown key (known keys: {known})", key=prefix + key)
    for key, f in fields.items():
        if key in table:
            value = _convert(table[key], f, prefix + key)
        elif f.default is _REQUIRED:
            raise ConfigError("missing required key", key=prefix + key)
        else:
            value = f.default
        if f.check and value is not None:
            reason = f.check(value)
            if reason:
                raise ConfigError(reason, key=prefix + key)
        out[key] = value
    return out


def at_least(low: int) -> Callable[[Any], str | None]:
    """A check that a number is at least ``low``."""
    return lambda v: None if v >= low else f"must be at least {low}, got {v}"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    """A check that a string is one of ``choices``."""
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"


STORE_FIELDS = {
    "path": Field(str, str(DEFAULT_STORE), doc="store directory, relative to this file"),
    "verify_reads": Field(bool, True, doc="re-hash every chunk on read"),
    "durability": Field(str, "local", one_of("local", "remote"),
                        doc="remote: a write is acknowledged only once the cold tier "
                            "(S3) holds every chunk it stored"),
}


def _peer_urls(value: dict[str, Any]) -> str | None:
    for name, url in value.items():
        if not isinstance(url, str) or not re.fullmatch(r"https?://[^/\s]+/?", url):
            return f"peer {name!r}: expected a base URL such as \"http://node-b:7070\", " \
                   f"got {url!r}"
    return None


def _listen(value: str) -> str | None:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"expected HOST:PORT, got {value!r}"
    return None


CLUSTER_FIELDS = {
    "node": Field(str, "", doc="this node's name on the placement ring (default: hostname)"),
    "listen": Field(str, "127.0.0.1:7070", _listen,
                    doc="where `stellar node serve` serves this node's chunks by hash"),
    "peers": Field(dict, {}, _peer_urls, doc="other nodes by name: their base URLs"),
    "fanout": Field(int, 2, at_least(1), doc="peers asked for a chunk, in ring order"),
    "timeout": Field(float, 5.0, lambda v: None if 0 < v <= 600 else "must be in (0, 600]",
                     doc="seconds per request to a peer"),
}
PLUGIN_FIELDS = {"name": Field(str), "params": Field(dict, {})}
TIER_FIELDS = {
    "plugin": Field(str),
    "capacity": Field("size", None),
    "params": Field(dict, {}),
}
#: The runtime plugin whose defaults the [vm] table holds; it owns (and checks) their schema.
VM_RUNTIME = "volt"


@dataclass
class PluginChoice:
    """A plugin picked by name, with its parameter table."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TierChoice:
    """A tier level's backend plugin, capacity (None: unbounded) and params."""

    plugin: str
    capacity: int | None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class HostConfig:
    """The effective host config, defaults filled in and paths made absolute."""

    source: Path | None
    store_path: Path
    verify_reads: bool = True
    hasher: PluginChoice = field(default_factory=lambda: PluginChoice("blake3"))
    chunker: PluginChoice = field(default_factory=lambda: PluginChoice("fastcdc"))
    #: How new chunks are compressed: a ``stellarium.compressors`` plugin, or "none".
    compressor: PluginChoice = field(default_factory=lambda: PluginChoice("lz4"))
    tiers: dict[str, TierChoice] = field(default_factory=dict)
    #: The [vm] table as written: VM defaults, checked by the VM_RUNTIME plugin.
    vm: dict[str, Any] = field(default_factory=dict)
    durability: str = "local"
    cluster: dict[str, Any] = field(default_factory=lambda: validate_params({}, CLUSTER_FIELDS))

    def to_dict(self) -> dict[str, Any]:
        """The config as a TOML-shaped dict (what ``stellar host show`` prints)."""
        return {
            "store": {"path": str(self.store_path), "verify_reads": self.verify_reads,
                      "durability": self.durability},
            "hasher": {"name": self.hasher.name, "params": self.hasher.params},
            "chunker": {"name": self.chunker.name, "params": self.chunker.params},
            "compressor": {"name": self.compressor.name, "params": self.compressor.params},
            "tiers": {lvl: {"plugin": t.plugin, "params": t.params,
                            **({"capacity": t.capacity} if t.capacity is not None else {})}
                      for lvl, t in self.tiers.items()},
            "vm": dict(self.vm),
            "cluster": dict(self.cluster),
        }


def _section(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"expected a table, got {type(value).__name__}", key=name)
    return value


def parse(data: Mapping[str, Any], source: Path | None = None) -> HostConfig:
    """Validate a parsed TOML document and build the effective config."""
    sections = {"store", "hasher", "chunker", "compressor", "tiers", "vm", "cluster"}
    for key in data:
        if key not in sections:
            raise ConfigError(f"unknown section (known: {', '.join(sorted(sections))})", key=key)
    if "compression" in _section(data, "store"):
        raise ConfigError("compression is chosen in its own section now: [compressor] "
                          "name = \"lz4\" (or \"zstd\", \"none\")", key="store.compression")
    store = validate_params(_section(data, "store"), STORE_FIELDS, "store.")
    base = source.resolve().parent if source else Path.cwd()
    store_path = (base / Path(store["path"]).expanduser()).resolve()
    plugins = {}
    for kind, default in (("hasher", "blake3"), ("chunker", "fastcdc"), ("compressor", "lz4")):
        fields = dict(PLUGIN_FIELDS, name=Field(str, default))
        plugins[kind] = PluginChoice(**validate_params(_section(data, kind), fields, f"{kind}."))
    tiers = {}
    for level, table in _section(data, "tiers").items():
        if level not in TIER_LEVELS:
            raise ConfigError(f"unknown tier level (levels: {', '.join(TIER_LEVELS)})",
                              key=f"tiers.{level}")
        if not isinstance(table, dict):
            raise ConfigError("expected a table", key=f"tiers.{level}")
        tiers[level] = TierChoice(**validate_params(table, TIER_FIELDS, f"tiers.{level}."))
    cluster = validate_params(_section(data, "cluster"), CLUSTER_FIELDS, "cluster.")
    if store["durability"] == "remote" and "cold" not in tiers:
        raise ConfigError("durability \"remote\" needs a cold tier to be durable in "
                          "(add [tiers.cold], e.g. plugin = \"s3\")", key="store.durability")
    if cluster["node"] in cluster["peers"]:
        raise ConfigError(f"this node ({cluster['node']!r}) is listed as its own peer",
                          key="cluster.peers")
    return HostConfig(source, store_path, store["verify_reads"], plugins["hasher"],
                      plugins["chunker"], plugins["compressor"], tiers, dict(_section(data, "vm")),
                      store["durability"], cluster)


def config_path(explicit: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """Where the config is: ``--config``, then ``$STELLAR_CONFIG``, then the default.

    The flag says whether the path was asked for; only then is a missing file an error.
    """
    if explicit:
        return Path(explicit), True
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]), True
    try:
        return DEFAULT_PATH.expanduser(), False
    except RuntimeError:          # no $HOME and no passwd entry for this uid
        raise ConfigError(f"no home directory to find {DEFAULT_PATH} in; give --config "
                          f"or set ${ENV_VAR}") from None


def load(explicit: str | os.PathLike[str] | None = None) -> HostConfig:
    """Find, read and validate the host config; errors name file, key and reason."""
    path, asked = config_path(explicit)
    if not path.exists():
        if asked:
            raise ConfigError("no such file", file=str(path))
        return parse({}, None)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"TOML syntax error: {exc}", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", file=str(path)) from None
    try:
        return parse(data, path)
    except ConfigError as exc:
        raise ConfigError(exc.reason, file=str(path), key=exc.key) from None
