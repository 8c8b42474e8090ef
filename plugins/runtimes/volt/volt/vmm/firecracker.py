"""Firecracker's config file and API bodies, mapped onto the one VM schema, :class:`VmConfig`.

Volt follows Firecracker's API as of :data:`FIRECRACKER_API` (the swagger in
``src/firecracker/swagger/firecracker.yaml`` at that tag). Each Firecracker object
(boot-source, machine-config, a drive, a network interface, vsock, entropy, balloon)
becomes VmConfig settings or a :class:`DeviceSpec` with the plugin names and
parameters agreed in DEVICE_PARAMS.md; VmConfig then checks the result, so a
config file, an API request and ``volt run`` flags get the same validation. Errors
name the Firecracker field (``machine-config.mem_size_mib: must be 8..65536 MiB``).

What Volt cannot honour is refused by name rather than ignored (rate limiters, SMT,
CPU templates, io_uring, vhost-user drives, MMDS, pmem, memory hotplug), except
``cache_type``: Volt's block devices always offer and honour FLUSH (``Writeback``),
which is safe for a guest that asked for ``Unsafe``. ``null`` means "not given", as
in Firecracker.

A VM TOML (``--config-file vm.toml``) is the same machine in Volt's words: the keys
of the host config's ``[vm]`` table, plus optional ``[logger]`` and ``[metrics]``
tables with Firecracker's field names.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from stellarium_core.config import Field, one_of, validate_params
from stellarium_core.errors import ConfigError
from volt.vmm.config import DEVICE_FIELDS, DeviceSpec, Layer, VmConfig, truthy

#: The Firecracker release whose API and config file Volt follows.
FIRECRACKER_API = "1.16.1"
#: A config file larger than this is refused unread (Firecracker's own API limit is 50 KiB).
MAX_FILE_BYTES = 1 << 20
STELLAR = "stellar:"

DRIVE_PLUGINS = ("virtio-blk", "virtio-stellar")
NET, VSOCK, RNG, BALLOON = "virtio-net", "virtio-vsock", "virtio-rng", "virtio-balloon"
#: Ids Firecracker leaves implicit: its single vsock (unless vsock_id), entropy, balloon.
VSOCK_ID, ENTROPY_ID, BALLOON_ID = "vsock", "entropy", "balloon"

#: Where each VmConfig setting lives in a Firecracker config file / API body.
FILE_NAMES = {"kernel": "boot-source.kernel_image_path", "initrd": "boot-source.initrd_path",
              "cmdline": "boot-source.boot_args", "memory_mib": "machine-config.mem_size_mib",
              "vcpus": "machine-config.vcpu_count", "hugepages": "machine-config.huge_pages",
              "root": "drives", "root_partuuid": "drives"}
API_NAMES = {k: v.split(".")[-1] for k, v in FILE_NAMES.items()}


@dataclass(frozen=True)
class Telemetry:
    """Process-level settings a config file may carry besides the VM: Firecracker's
    ``logger`` and ``metrics`` objects, checked (see :func:`logger` and :func:`metrics`)."""

    logger: Mapping[str, Any] | None = None
    metrics: Mapping[str, Any] | None = None


# -- checking one object ------------------------------------------------------------------


def checked(body: Any, spec: Mapping[str, Field], where: str = "") -> dict[str, Any]:
    """``body`` checked against ``spec``: an object, ``null`` members dropped (absent)."""
    if not isinstance(body, Mapping):
        raise ConfigError(f"expected an object, got {_json_type(body)}", key=where or None)
    given = {k: v for k, v in body.items() if v is not None}
    return validate_params(given, spec, prefix=f"{where}." if where else "")


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _refuse(value: Any, reason: str) -> str | None:
    return None if value in (None, False, "None", [], {}) else reason


def _no_limit(what: str) -> Field:
    """A Firecracker RateLimiter Volt cannot apply: only null or one without buckets."""
    def check(v: Any) -> str | None:
        if not isinstance(v, Mapping) or any(v.get(k) for k in ("bandwidth", "ops")) \
                or set(v) - {"bandwidth", "ops"}:
            return f"{what} has no rate limiter in Volt; leave it null"
        return None
    return Field(dict, None, check)


def _at_least(low: int) -> Any:
    return lambda v: None if v >= low else f"must be at least {low}, got {v}"


def api_id_problem(value: str) -> str | None:
    """Why ``value`` cannot be an id in an API path (Firecracker's rule), or None."""
    ok = value and len(value) <= 64 and all(c.isascii() and (c.isalnum() or c == "_")
                                             for c in value)
    return None if ok else ("API Resource IDs can only contain alphanumeric characters and "
                            "underscores (at most 64)")


# -- the objects --------------------------------------------------------------------------

BOOT_SOURCE = {"kernel_image_path": Field(str), "boot_args": Field(str, None),
               "initrd_path": Field(str, None)}

MACHINE_CONFIG = {
    "vcpu_count": Field(int), "mem_size_mib": Field(int),
    "smt": Field(bool, False, lambda v: _refuse(v, "Volt gives vCPUs no SMT siblings; "
                                                   "only false is supported")),
    "track_dirty_pages": Field(bool, False, lambda v: _refuse(
        v, "dirty page tracking comes with snapshots, which Volt does not have yet")),
    "huge_pages": Field(str, "None", one_of("None", "2M")),
    "cpu_template": Field(str, "None", lambda v: _refuse(v, "Volt has no CPU templates")),
}

DRIVE = {
    "drive_id": Field(str), "is_root_device": Field(bool), "partuuid": Field(str, None),
    "cache_type": Field(str, "Unsafe", one_of("Unsafe", "Writeback")),
    "is_read_only": Field(bool), "path_on_host": Field(str),
    "rate_limiter": _no_limit("a drive"),
    "io_engine": Field(str, "Sync", lambda v: None if v == "Sync" else (
        "Volt serves drives synchronously (Sync); io_uring (Async) is not built"
        if v == "Async" else f"must be Sync or Async, got {v!r}")),
    "socket": Field(str, None, lambda v: "Volt has no vhost-user-blk front-end yet; give "
                                         "path_on_host instead"),
}

NETWORK_INTERFACE = {
    "iface_id": Field(str), "host_dev_name": Field(str), "guest_mac": Field(str, None),
    "mtu": Field(int, None, lambda v: "virtio-net takes no MTU parameter in Volt; leave it "
                                      "null"),
    "rx_rate_limiter": _no_limit("a network interface"),
    "tx_rate_limiter": _no_limit("a network interface"),
}

VSOCK_FIELDS = {"guest_cid": Field(int, check=_at_least(3)), "uds_path": Field(str),
                "vsock_id": Field(str, None)}

TOKEN_BUCKET = {"size": Field(int, check=_at_least(0)),
                "refill_time": Field(int, check=_at_least(1)),
                "one_time_burst": Field(int, None, lambda v: _refuse(
                    v, "virtio-rng has no burst allowance in Volt"))}

BALLOON_FIELDS = {
    "amount_mib": Field(int, check=_at_least(0)), "deflate_on_oom": Field(bool),
    "stats_polling_interval_s": Field(int, 0, _at_least(0)),
    "free_page_hinting": Field(bool, False, lambda v: _refuse(
        v, "free page hinting is not offered by Volt's virtio-balloon")),
    "free_page_reporting": Field(bool, False, lambda v: _refuse(
        v, "free page reporting is not offered by Volt's virtio-balloon")),
}
PARTIAL_DRIVE = {"drive_id": Field(str), "path_on_host": Field(str, None),
                 "rate_limiter": _no_limit("a drive")}
PARTIAL_NETWORK_INTERFACE = {"iface_id": Field(str),
                             "rx_rate_limiter": _no_limit("a network interface"),
                             "tx_rate_limiter": _no_limit("a network interface")}
BALLOON_UPDATE = {"amount_mib": Field(int, check=_at_least(0))}
BALLOON_STATS_UPDATE = {"stats_polling_interval_s": Field(int, check=_at_least(0))}

LOGGER = {"level": Field(str, "Info", lambda v: None if v.lower() in LEVELS else
                         f"must be one of Error, Warning, Info, Debug, Trace, Off, got {v!r}"),
          "log_path": Field(str, None), "show_level": Field(bool, False),
          "show_log_origin": Field(bool, False), "module": Field(str, None)}
LEVELS = ("error", "warning", "info", "debug", "trace", "off")
METRICS = {"metrics_path": Field(str)}

_MEMORY_IN_STORE = ("Volt keeps guest memory in the store, as the snapshot's chunks; "
                    "leave it out")
SNAPSHOT_CREATE = {"snapshot_type": Field(str, "Full", one_of("Full", "Diff")),
                   "snapshot_path": Field(str, doc="the snapshot's name in the store"),
                   "mem_file_path": Field(str, None, lambda v: _MEMORY_IN_STORE)}
SNAPSHOT_LOAD = {"snapshot_path": Field(str, doc="the snapshot's name in the store"),
                 "resume_vm": Field(bool, False),
                 "mem_file_path": Field(str, None, lambda v: _MEMORY_IN_STORE),
                 "mem_backend": Field(dict, None, lambda v: _MEMORY_IN_STORE)}
MIGRATE = {"to": Field(str, doc="HOST:PORT where `volt run --incoming` waits"),
           "timeout_s": Field(int, 30, _at_least(1))}
VM_STATE = {"state": Field(str, check=one_of("Paused", "Resumed"))}
ACTION = {"action_type": Field(str, check=one_of("FlushMetrics", "InstanceStart",
                                                 "SendCtrlAltDel"))}


def boot_source(body: Any, base: VmConfig, where: str = "") -> dict[str, Any]:
    """VmConfig settings of a BootSource; no boot_args keeps ``base``'s command line."""
    b = checked(body, BOOT_SOURCE, where)
    return {"kernel": b["kernel_image_path"], "initrd": b["initrd_path"] or "",
            "cmdline": b["boot_args"] if b["boot_args"] is not None else base.cmdline}


def machine_config(body: Any, where: str = "", *, partial: bool = False) -> dict[str, Any]:
    """VmConfig settings of a MachineConfiguration (PATCH: only the members given)."""
    spec = MACHINE_CONFIG if not partial else {
        k: Field(f.kind, None, f.check) for k, f in MACHINE_CONFIG.items()}
    m = checked(body, spec, where)
    out = {"vcpus": m["vcpu_count"], "memory_mib": m["mem_size_mib"],
           "hugepages": None if m["huge_pages"] is None else m["huge_pages"] == "2M"}
    return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class Drive:
    """A Firecracker drive as a device, and whether it is the root device."""

    spec: DeviceSpec
    root: bool
    partuuid: str


def drive(body: Any, where: str = "") -> Drive:
    """A Drive: ``stellar:volume/NAME`` and ``stellar:image/NAME`` are virtio-stellar disks,
    any other path a raw file behind virtio-blk (its drive_id is the disk's serial)."""
    d = checked(body, DRIVE, where)
    ident, ro, path = d["drive_id"], d["is_read_only"], d["path_on_host"]
    at = f"{where}.path_on_host" if where else "path_on_host"
    if path.startswith(STELLAR):
        kind, _, name = path[len(STELLAR):].partition("/")
        if kind not in ("volume", "image") or not name:
            raise ConfigError(f"use {STELLAR}volume/NAME or {STELLAR}image/NAME, got {path!r}",
                              key=at)
        if kind == "image" and not ro:
            raise ConfigError("an image's VM disk is read-only; set is_read_only to true",
                              key=f"{where}.is_read_only" if where else "is_read_only")
        spec = DeviceSpec("virtio-stellar", {kind: name, "readonly": ro}, ident)
    else:
        spec = DeviceSpec("virtio-blk", {"path": path, "readonly": ro, "serial": ident}, ident)
    return Drive(spec, d["is_root_device"], d["partuuid"] or "")


def network_interface(body: Any, where: str = "") -> DeviceSpec:
    n = checked(body, NETWORK_INTERFACE, where)
    params = {"tap": n["host_dev_name"]}
    if n["guest_mac"] is not None:
        params["mac"] = n["guest_mac"]
    return DeviceSpec(NET, params, n["iface_id"])


def vsock(body: Any, where: str = "") -> DeviceSpec:
    v = checked(body, VSOCK_FIELDS, where)
    return DeviceSpec(VSOCK, {"guest_cid": v["guest_cid"], "uds_path": v["uds_path"]},
                      v["vsock_id"] or VSOCK_ID)


def entropy(body: Any, where: str = "") -> DeviceSpec:
    """An EntropyDevice; its bandwidth bucket becomes bytes_per_sec (size per refill_time)."""
    e = checked(body, {"rate_limiter": Field(dict, None)}, where)
    rate = 0
    if e["rate_limiter"] is not None:
        at = f"{where}.rate_limiter" if where else "rate_limiter"
        lim = checked(e["rate_limiter"], {"bandwidth": Field(dict, None), "ops": Field(
            dict, None, lambda v: "virtio-rng limits bytes, not operations, in Volt")}, at)
        if lim["bandwidth"] is not None:
            b = checked(lim["bandwidth"], TOKEN_BUCKET, f"{at}.bandwidth")
            rate = b["size"] * 1000 // b["refill_time"]
    return DeviceSpec(RNG, {"bytes_per_sec": rate}, ENTROPY_ID)


def balloon(body: Any, where: str = "") -> DeviceSpec:
    b = checked(body, BALLOON_FIELDS, where)
    return DeviceSpec(BALLOON, {k: b[k] for k in ("amount_mib", "deflate_on_oom",
                                                 "stats_polling_interval_s")}, BALLOON_ID)


def stellar_device(body: Any, ident: str, where: str = "") -> DeviceSpec:
    """Volt's own device table ``{plugin, params}`` (the ``/stellar/devices`` extension)."""
    d = checked(body, {k: f for k, f in DEVICE_FIELDS.items() if k != "id"}, where)
    return DeviceSpec(d["plugin"], d["params"], ident)


def logger(body: Any, where: str = "") -> dict[str, Any]:
    return checked(body, LOGGER, where)


def metrics(body: Any, where: str = "") -> dict[str, Any]:
    return checked(body, METRICS, where)


# -- changing a VmConfig (the API) ----------------------------------------------------------


def with_settings(cfg: VmConfig, settings: Mapping[str, Any],
                  names: Mapping[str, str] = API_NAMES) -> VmConfig:
    """``cfg`` with ``settings`` changed, checked as a whole; errors use ``names``."""
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    try:
        return VmConfig(**{**values, **settings})
    except ConfigError as exc:
        raise ConfigError(exc.reason, key=names.get(exc.key or "", exc.key)) from None


def put_device(cfg: VmConfig, spec: DeviceSpec, plugins: tuple[str, ...], what: str,
               **settings: Any) -> VmConfig:
    """``cfg`` with ``spec`` replacing the device of the same id (in place) or added last.

    An id already used by another kind of device (a drive named like an interface)
    is refused, as is changing the plugin kind behind an id.
    """
    old = next((d for d in cfg.devices if d.id == spec.id), None)
    if old is not None and old.plugin not in plugins:
        raise ConfigError(f"the id {spec.id!r} already names a {old.plugin} device, not a "
                          f"{what}")
    devices = [spec if d.id == spec.id else d for d in cfg.devices]
    if old is None:
        devices.append(spec)
    return with_settings(cfg, {"devices": tuple(devices), **settings})


def put_drive(cfg: VmConfig, d: Drive) -> VmConfig:
    """``cfg`` with drive ``d``; at most one drive is the root device, as in Firecracker."""
    if d.root and cfg.root and cfg.root != d.spec.id:
        raise ConfigError(f"drive {cfg.root!r} is already the root device (a VM has one)",
                          key="is_root_device")
    root = {"root": d.spec.id, "root_partuuid": d.partuuid} if d.root else (
        {"root": "", "root_partuuid": ""} if cfg.root == d.spec.id else {})
    return put_device(cfg, d.spec, DRIVE_PLUGINS, "drive", **root)


# -- a config file ------------------------------------------------------------------------

#: Firecracker config-file sections Volt has nothing for: allowed only empty or null.
UNSUPPORTED = {"cpu-config": "Volt has no CPU templates",
               "mmds-config": "Volt has no MMDS (microVM metadata service)",
               "pmem": "Volt has no virtio-pmem device yet",
               "memory-hotplug": "Volt has no memory hotplug (virtio-mem)",
               "serial": "Volt's serial console is set with --serial"}
SECTIONS = ("boot-source", "drives", "machine-config", "network-interfaces", "vsock",
            "entropy", "balloon", "logger", "metrics", "stellar-devices", *UNSUPPORTED)


def file_layer(path: str, base: VmConfig) -> tuple[Layer, Telemetry]:
    """The VM a config file describes, as a layer over ``base`` (the host's [vm] defaults),
    and the logger/metrics it asks for. A ``.toml`` file is a VM TOML; anything else is
    Firecracker's JSON. Errors name the file and the field (exit code 2)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(exc.strerror or str(exc), file=path) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"larger than {MAX_FILE_BYTES >> 20} MiB; not a VM config", file=path)
    if path.endswith(".toml"):
        return _toml_layer(raw, path)
    data = _parse_json(raw, path)
    try:
        settings, telemetry = from_firecracker(data, base)
    except ConfigError as exc:
        raise ConfigError(exc.reason, file=path, key=exc.key) from None
    return Layer(settings, "file", path, FILE_NAMES), telemetry


def _parse_json(raw: bytes, path: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"line {exc.lineno} column {exc.colno}: {exc.msg}", file=path) from None
    except (UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else "not UTF-8 text"
        raise ConfigError(f"invalid JSON: {reason}", file=path) from None


def _toml_layer(raw: bytes, path: str) -> tuple[Layer, Telemetry]:
    try:
        table = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"invalid TOML: {exc}", file=path) from None
    try:
        telemetry = Telemetry(*(fn(table.pop(k), k) if k in table else None
                                for k, fn in (("logger", logger), ("metrics", metrics))))
    except ConfigError as exc:
        raise ConfigError(exc.reason, file=path, key=exc.key) from None
    return Layer(table, "file", path), telemetry


def from_firecracker(data: Any, base: VmConfig) -> tuple[dict[str, Any], Telemetry]:
    """VmConfig settings and telemetry of a Firecracker config-file object."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a JSON object at the top, got {_json_type(data)}")
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(f"unknown section (known: {', '.join(SECTIONS)})", key=key)
    for key, reason in UNSUPPORTED.items():
        if data.get(key) not in (None, [], {}):
            raise ConfigError(f"{reason}; leave it out or null", key=key)
    if data.get("boot-source") is None:
        raise ConfigError("missing: a config file must say which kernel to boot",
                          key="boot-source")
    settings = boot_source(data["boot-source"], base, "boot-source")
    if data.get("machine-config") is not None:
        settings.update(machine_config(data["machine-config"], "machine-config"))
    devices: list[DeviceSpec] = []
    for i, body in enumerate(_list(data, "drives")):
        d = drive(body, f"drives[{i}]")
        if d.root:
            if settings.get("root"):
                raise ConfigError(f"drive {settings['root']!r} is already the root device",
                                  key=f"drives[{i}].is_root_device")
            settings.update(root=d.spec.id, root_partuuid=d.partuuid)
        devices.append(d.spec)
    devices += [network_interface(b, f"network-interfaces[{i}]")
                for i, b in enumerate(_list(data, "network-interfaces"))]
    for key, make in (("vsock", vsock), ("entropy", entropy), ("balloon", balloon)):
        if data.get(key) is not None:
            devices.append(make(data[key], key))
    for i, body in enumerate(_list(data, "stellar-devices")):
        t = checked(body, DEVICE_FIELDS, f"stellar-devices[{i}]")
        devices.append(DeviceSpec(t["plugin"], t["params"], t["id"]))
    settings["devices"] = devices
    telemetry = Telemetry(*(fn(data[k], k) if data.get(k) is not None else None
                            for k, fn in (("logger", logger), ("metrics", metrics))))
    return settings, telemetry


def _list(data: Mapping[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"expected an array, got {_json_type(value)}", key=key)
    return value


# -- rendering (GET /vm/config, GET /machine-config) ----------------------------------------


def render_machine_config(cfg: VmConfig) -> dict[str, Any]:
    return {"vcpu_count": cfg.vcpus, "mem_size_mib": cfg.memory_mib, "smt": False,
            "track_dirty_pages": False, "huge_pages": "2M" if cfg.hugepages else "None"}


def render(cfg: VmConfig, telemetry: Telemetry) -> dict[str, Any]:
    """``cfg`` as Firecracker's FullVmConfiguration: what GET /vm/config answers, and a
    config file ``--config-file`` takes back (devices of other plugins go under
    ``stellar-devices``)."""
    by: dict[str, list[DeviceSpec]] = {}
    for d in cfg.devices:
        by.setdefault(d.plugin if d.plugin not in DRIVE_PLUGINS else "drive", []).append(d)
    one = {k: (by.get(k) or [None])[0] for k in (VSOCK, RNG, BALLOON)}
    out: dict[str, Any] = {
        "boot-source": {"kernel_image_path": cfg.kernel, "boot_args": cfg.cmdline,
                        "initrd_path": cfg.initrd or None} if cfg.kernel else None,
        "drives": [_render_drive(cfg, d) for d in by.get("drive", [])],
        "machine-config": render_machine_config(cfg),
        "cpu-config": None,
        "balloon": one[BALLOON] and {k: _plain(one[BALLOON].params.get(k, d)) for k, d in
                                     (("amount_mib", 0), ("deflate_on_oom", False),
                                      ("stats_polling_interval_s", 0))},
        "network-interfaces": [{"iface_id": d.id, "host_dev_name": d.params.get("tap"),
                                "guest_mac": d.params.get("mac"), "rx_rate_limiter": None,
                                "tx_rate_limiter": None} for d in by.get(NET, [])],
        "vsock": one[VSOCK] and {"guest_cid": _plain(one[VSOCK].params.get("guest_cid")),
                                 "uds_path": one[VSOCK].params.get("uds_path"),
                                 "vsock_id": one[VSOCK].id},
        "logger": dict(telemetry.logger) if telemetry.logger else None,
        "metrics": dict(telemetry.metrics) if telemetry.metrics else None,
        "mmds-config": None,
        "entropy": one[RNG] and {"rate_limiter": _render_rate(one[RNG])},
        "pmem": [],
        "memory-hotplug": None,
    }
    known = (*DRIVE_PLUGINS, NET, VSOCK, RNG, BALLOON)
    others = [d.to_dict() for d in cfg.devices if d.plugin not in known
              or (d.plugin in (VSOCK, RNG, BALLOON) and d is not one[d.plugin])]
    if others:
        out["stellar-devices"] = others
    return out


def _render_drive(cfg: VmConfig, d: DeviceSpec) -> dict[str, Any]:
    p = d.params
    if d.plugin == "virtio-blk":
        path = p.get("path")
    else:
        kind = "image" if "image" in p else "volume"
        path = f"{STELLAR}{kind}/{p.get(kind)}"
    root = d.id == cfg.root
    return {"drive_id": d.id, "partuuid": (cfg.root_partuuid or None) if root else None,
            "is_root_device": root, "cache_type": "Writeback",
            "is_read_only": truthy(p.get("readonly", False)) or "image" in p,
            "path_on_host": path, "io_engine": "Sync", "rate_limiter": None, "socket": None}


def _render_rate(d: DeviceSpec) -> dict[str, Any] | None:
    rate = _plain(d.params.get("bytes_per_sec", 0))
    return {"bandwidth": {"size": rate, "refill_time": 1000}} if rate else None


def _plain(value: Any) -> Any:
    """A ``--device`` string parameter as the JSON number or boolean it stands for."""
    if isinstance(value, str):
        if value.isdigit():
            return int(value)
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
    return value

