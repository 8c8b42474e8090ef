"""VmConfig: the one description of a microVM, whoever writes it.

``volt run`` flags, the host config's ``[vm]`` table, the runtime plugin's spec, a
VM config file (Firecracker's JSON or a VM TOML, :mod:`volt.vmm.firecracker`) and the
REST API are *layers* of the same schema, :data:`SETTINGS`. Each layer is checked key
by key with the core's :func:`~stellarium_core.config.validate_params` machinery, and
an error names the place it came from: ``--mem 4: ...`` for a flag (with that
setting's exit code), ``host.toml: vm.memory_mib: ...`` for the host config,
``vm.json: machine-config.mem_size_mib: ...`` for a config file, ``memory_mib: ...``
for a spec.

Devices are :class:`DeviceSpec` entries (plugin name, parameter table, id), so
Firecracker's drives, network interfaces, vsock, entropy and balloon all map onto
``devices``; the plugin that makes each device validates its own parameters. The
``root`` device (Firecracker's ``is_root_device``) goes first, so Linux names it
``/dev/vda``, and the kernel command line gets ``root=/dev/vda ro|rw``.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from stellarium_core.config import Field, HostConfig, one_of, validate_params
from stellarium_core.errors import ConfigError, StellarError
from volt.vmm import exitcodes
from volt.vmm.exitcodes import VoltError

DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=off"
BOOT_MODES = ("auto", "linux64", "pvh")
MIN_MEM_MIB = 8
MAX_MEM_MIB = 64 * 1024
MAX_VCPUS = 32
CMDLINE_MAX = 2047
HUGE_PAGE_MIB = 2
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: The device id ``--image`` gives its root disk.
IMAGE_ROOT_ID = "root"


@dataclass(frozen=True)
class DeviceSpec:
    """One virtio device: the plugin that makes it, that plugin's parameters, an id unique
    in the VM (Firecracker's drive_id / iface_id / vsock_id)."""

    plugin: str
    params: Mapping[str, Any] = field(default_factory=dict)
    id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"plugin": self.plugin, "id": self.id, "params": dict(self.params)}


def parse_device_option(spec: str) -> DeviceSpec:
    """``NAME[,key=value...]`` from ``--device`` (values stay strings; the plugin checks)."""
    name, *pairs = spec.split(",")
    if not name:
        raise VoltError(f"--device {spec!r}: missing device name", exitcodes.DEVICE)
    params: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise VoltError(f"--device {spec!r}: {pair!r} is not key=value", exitcodes.DEVICE)
        params[key] = value
    return DeviceSpec(name, params)


def _device_specs(value: Any) -> tuple[DeviceSpec, ...]:
    """A list of DeviceSpecs or tables ``{plugin, id?, params?}``; ids default to plugin+index."""
    if not isinstance(value, list | tuple):
        raise ValueError(f"expected a list of devices, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, Mapping):
            try:
                t = validate_params(item, DEVICE_FIELDS)
            except ConfigError as exc:
                raise ValueError(f"[{i}].{exc.key}: {exc.reason}") from None
            item = DeviceSpec(t["plugin"], dict(t["params"]), t["id"])
        elif not isinstance(item, DeviceSpec):
            raise ValueError(f"[{i}]: expected a table with plugin, id and params, "
                             f"got {type(item).__name__}")
        out.append(item if item.id else DeviceSpec(item.plugin, item.params, f"{item.plugin}{i}"))
    return tuple(out)


DEVICE_FIELDS = {
    "plugin": Field(str, doc="device plugin name (stellar plugins)"),
    "id": Field(str, ""),
    "params": Field(dict, {}),
}


def _serial(v: str) -> str | None:
    kind, colon, path = v.partition(":")
    if v in ("stdout", "none") or (colon and kind in ("file", "unix") and path):
        return None
    return f"use stdout, none, file:PATH or unix:PATH, got {v!r}"


def _partuuid(v: str) -> str | None:
    return None if v == "" or re.fullmatch(r"[0-9A-Fa-f-]{1,64}", v) else \
        f"a PARTUUID is hex digits and dashes, got {v!r}"


def truthy(value: Any) -> bool:
    """A device parameter as a boolean (``--device`` values arrive as strings)."""
    return value is True or str(value).strip().lower() in ("1", "true", "yes", "on")


def _range(low: int, high: int, unit: str = "") -> Any:
    return lambda v: None if low <= v <= high else f"must be {low}..{high}{unit}, got {v}"


@dataclass(frozen=True)
class Setting:
    """One VmConfig field: its check, its ``volt run`` flag and the exit code of a bad value."""

    field: Field
    flag: str
    exit_code: int
    help: str
    metavar: str | None = None


SETTINGS: dict[str, Setting] = {
    "kernel": Setting(Field(str, ""), "--kernel", exitcodes.KERNEL,
                      "ELF vmlinux or bzImage: a path, or a name or digest from "
                      "`volt kernel list`", "PATH|NAME"),
    "initrd": Setting(Field(str, ""), "--initrd", exitcodes.INITRD,
                      "initramfs: a path, or a name or digest from `volt kernel list`",
                      "PATH|NAME"),
    "cmdline": Setting(Field(str, DEFAULT_CMDLINE, lambda v: None if len(v) <= CMDLINE_MAX
                             else f"the command line is {len(v)} bytes, longer than "
                                  f"{CMDLINE_MAX}"),
                       "--cmdline", exitcodes.CMDLINE, "kernel command line"),
    "boot": Setting(Field(str, "auto", one_of(*BOOT_MODES)), "--boot",
                    exitcodes.USAGE, "entry: 64-bit boot protocol or PVH (auto: PVH for a "
                    "vmlinux with a PVH note, else 64-bit); any other value names a boot "
                    "manifest (`volt boot list`): its kernel, initrd, root disk, command "
                    "line, memory and vCPUs are the defaults other flags override, and its "
                    "prefetch set is read before the vCPUs start", "MODE|MANIFEST"),
    "manifest": Setting(Field(str, ""), "--boot", exitcodes.USAGE,
                        "boot manifest name or digest (given as --boot NAME)"),
    "memory_mib": Setting(Field(int, 128, _range(MIN_MEM_MIB, MAX_MEM_MIB, " MiB")), "--mem",
                          exitcodes.MEMORY, "guest memory in MiB", "MIB"),
    "vcpus": Setting(Field(int, 1, _range(1, MAX_VCPUS)), "--vcpus", exitcodes.USAGE,
                     "number of vCPUs"),
    "hugepages": Setting(Field(bool, False), "--hugepages", exitcodes.MEMORY,
                         "back guest memory with 2 MiB huge pages (reserved at start)"),
    "ksm": Setting(Field(bool, False), "--ksm", exitcodes.MEMORY,
                   "let the kernel merge identical guest pages (MADV_MERGEABLE)"),
    "serial": Setting(Field(str, "stdout", _serial), "--serial", exitcodes.DEVICE,
                      "console output: stdout, none, file:PATH or unix:PATH"),
    "devices": Setting(Field(object, ()), "--device", exitcodes.DEVICE,
                       "add a virtio device from an installed device plugin (repeatable)",
                       "NAME[,K=V...]"),
    "root": Setting(Field(str, ""), "--root", exitcodes.DEVICE,
                    "id of the device holding the root filesystem: it becomes /dev/vda and "
                    "the kernel gets root=/dev/vda ro|rw", "ID"),
    "root_partuuid": Setting(Field(str, "", _partuuid), "--root-partuuid", exitcodes.DEVICE,
                             "mount the root device's partition with this PARTUUID "
                             "(root=PARTUUID=...) instead of the whole disk", "UUID"),
}


@dataclass(frozen=True)
class VmConfig:
    """A microVM. Every field is checked on construction; errors are ConfigErrors keyed by
    field name (:func:`layered` turns them into the flag or config key the value came from).

    An empty ``kernel`` is a valid *config* (an API client sets it later); the builder
    refuses to boot without one.
    """

    kernel: str = ""
    initrd: str = ""
    cmdline: str = DEFAULT_CMDLINE
    boot: str = "auto"
    memory_mib: int = 128
    vcpus: int = 1
    hugepages: bool = False
    ksm: bool = False
    serial: str = "stdout"
    devices: tuple[DeviceSpec, ...] = ()
    root: str = ""
    root_partuuid: str = ""
    manifest: str = ""

    def __post_init__(self) -> None:
        values = check({f.name: getattr(self, f.name) for f in fields(self)})
        devices = values["devices"]
        if self.root:
            first = [d for d in devices if d.id == self.root]
            if not first:
                raise ConfigError(f"no device has the id {self.root!r} (device ids: "
                                  f"{', '.join(d.id for d in devices) or 'none'})", key="root")
            devices = (first[0], *(d for d in devices if d.id != self.root))
        elif self.root_partuuid:
            raise ConfigError("a root PARTUUID needs a root device", key="root_partuuid")
        object.__setattr__(self, "devices", devices)
        if self.hugepages and self.ksm:
            raise ConfigError("KSM cannot merge huge pages; choose hugepages or ksm", key="ksm")
        if self.hugepages and self.memory_mib % HUGE_PAGE_MIB:
            raise ConfigError(f"must be a multiple of {HUGE_PAGE_MIB} MiB with huge pages, "
                              f"got {self.memory_mib}", key="memory_mib")
        ids = [d.id for d in self.devices]
        for d in self.devices:
            if not DEVICE_ID.fullmatch(d.id):
                raise ConfigError(f"device id {d.id!r}: use letters, digits and . _ - "
                                  "(at most 64)", key="devices")
            if ids.count(d.id) > 1:
                raise ConfigError(f"device id {d.id!r} is used twice", key="devices")

    def to_dict(self) -> dict[str, Any]:
        """The config as a TOML-shaped table (what ``stellar host show`` prints for [vm])."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["devices"] = [d.to_dict() for d in self.devices]
        return out

    def root_cmdline(self) -> str:
        """`` root=/dev/vda ro`` (or ``rw``, or ``root=PARTUUID=...``) for the root device,
        read-only when its parameters say ``readonly`` or name an image (the block device
        parameters of DEVICE_PARAMS.md); empty without a root device."""
        if not self.root:
            return ""
        params = self.devices[0].params
        ro = truthy(params.get("readonly", False)) or "image" in params
        where = f"PARTUUID={self.root_partuuid}" if self.root_partuuid else "/dev/vda"
        return f" root={where} {'ro' if ro else 'rw'}"


def check(table: Mapping[str, Any]) -> dict[str, Any]:
    """Check the keys present in ``table`` against :data:`SETTINGS`; returns them converted.

    Raises ConfigError keyed by the field name for an unknown key, a wrong type or an
    impossible value.
    """
    out = {}
    for key, value in table.items():
        if key not in SETTINGS:
            raise ConfigError(f"unknown key (known keys: {', '.join(SETTINGS)})", key=key)
        if key == "devices":
            try:
                out[key] = _device_specs(value)
            except ValueError as exc:
                raise ConfigError(str(exc), key=key) from None
            continue
        out[key] = validate_params({key: value}, {key: SETTINGS[key].field})[key]
    return out


@dataclass(frozen=True)
class Layer:
    """Settings from one place, so an error names the flag, the [vm] key or the spec field."""

    values: Mapping[str, Any]
    kind: str                      # "flags" | "host" | "file" | "spec"
    file: str | None = None
    #: How a config file names each setting (``memory_mib`` -> ``machine-config.mem_size_mib``).
    names: Mapping[str, str] = field(default_factory=dict)

    def error(self, key: str | None, reason: str) -> StellarError:
        if self.kind == "flags" and key in SETTINGS:
            s = SETTINGS[key]
            shown = self.values.get(key)
            if key == "devices" or isinstance(shown, bool):
                return VoltError(f"{s.flag}: {reason}", s.exit_code)
            text = str(shown)
            text = text if len(text) <= 40 else text[:37] + "..."
            return VoltError(f"{s.flag} {text}: {reason}", s.exit_code)
        if self.kind == "host":
            return ConfigError(reason, file=self.file, key=f"vm.{key}" if key else "vm")
        if self.kind == "file":
            return ConfigError(reason, file=self.file, key=self.names.get(key or "", key))
        return ConfigError(reason, key=key)


def layered(*layers: Layer) -> VmConfig:
    """Later layers override earlier ones key by key (a device list is replaced whole)."""
    merged: dict[str, Any] = {}
    origin: dict[str, Layer] = {}
    for layer in layers:
        try:
            values = check(layer.values)
        except ConfigError as exc:
            raise layer.error(exc.key, exc.reason) from None
        merged.update(values)
        origin.update(dict.fromkeys(values, layer))
    try:
        return VmConfig(**merged)
    except ConfigError as exc:
        layer = origin.get(exc.key or "", layers[-1] if layers else Layer({}, "spec"))
        raise layer.error(exc.key, exc.reason) from None


def host_layer(host_config: HostConfig) -> Layer:
    """The host config's [vm] table as a layer."""
    return Layer(host_config.vm, "host", str(host_config.source) if host_config.source else None)


# -- the command line ---------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``volt run`` (and ``python -m volt.vmm``): the VmConfig flags, made
    from SETTINGS, and ``--timing``, an option of the launch rather than of the VM.

    Flags default to "not given", so the host config's [vm] table fills what is absent.
    """
    parser.add_argument("--timing", action="store_true",
                        help="print setup time (process start to first KVM_RUN) and the "
                             "vCPU exits by kind to stderr")
    parser.add_argument("--trace-chunks", metavar="FILE", default=None,
                        help="write the chunks the VM's disks read to FILE at exit, one "
                             "digest per line in first-access order (what `volt boot record "
                             "--trace-from-boot` records as a prefetch set)")
    parser.add_argument("--image", metavar="IMAGE", default=None,
                        help="boot from IMAGE's VM form: a read-only virtio-stellar root disk "
                             f"(= --device virtio-stellar,image=IMAGE with id "
                             f"{IMAGE_ROOT_ID!r} and --root {IMAGE_ROOT_ID})")
    for key, s in SETTINGS.items():
        if key == "manifest":
            continue              # given as --boot NAME
        default = s.field.default
        shown = f" (default: {default})" if default not in ("", ()) else ""
        kw: dict[str, Any] = {"dest": key, "default": argparse.SUPPRESS, "help": s.help + shown}
        if s.metavar:
            kw["metavar"] = s.metavar
        if key == "devices":
            parser.add_argument(s.flag, action="append", **kw)
        elif s.field.kind is bool:
            parser.add_argument(s.flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(s.flag, type=s.field.kind, **kw)


def flags_layer(args: argparse.Namespace) -> Layer:
    """The flags the user gave, as a layer (``--device`` strings parsed into DeviceSpecs;
    ``--image NAME`` is a read-only virtio-stellar root device ``root`` before them)."""
    given = {k: v for k, v in vars(args).items() if k in SETTINGS}
    if given.get("boot", BOOT_MODES[0]) not in BOOT_MODES:
        given["manifest"] = given.pop("boot")
    if "devices" in given:
        given["devices"] = [parse_device_option(d) for d in given["devices"]]
    image = getattr(args, "image", None)
    if image is not None:
        if "root" in given:
            raise VoltError("--image makes its disk the root device; drop --root",
                            exitcodes.USAGE)
        given["devices"] = [DeviceSpec("virtio-stellar", {"image": image}, IMAGE_ROOT_ID),
                            *given.get("devices", ())]
        given["root"] = IMAGE_ROOT_ID
    return Layer(given, "flags")


def manifest_layers(manifest: str, kernel: str, initrd: str, params: Mapping[str, str],
                    defaults: Mapping[str, Any], flags: Layer) -> tuple[Layer, Layer]:
    """A boot manifest's settings as a layer under ``flags``, and ``flags`` with the
    manifest's root disk (virtio-stellar ``params``, id ``root``) before its devices, as
    ``--image`` puts its disk. ``kernel`` and ``initrd`` are the manifest's digests."""
    values: dict[str, Any] = {"manifest": manifest, "kernel": kernel, "initrd": initrd,
                              **defaults}
    given = dict(flags.values)
    given.pop("manifest", None)      # the name resolved: the VM boots that digest
    if "root" in given:
        raise VoltError("--boot NAME makes the manifest's disk the root device; drop --root "
                        "and --image", exitcodes.USAGE)
    given["devices"] = [DeviceSpec("virtio-stellar", dict(params), IMAGE_ROOT_ID),
                        *given.get("devices", ())]
    given["root"] = IMAGE_ROOT_ID
    return Layer(values, "spec"), Layer(given, "flags")


def from_args(args: argparse.Namespace, host_config: HostConfig,
              file_layer: Layer | None = None,
              expand: Callable[[str, Layer], tuple[Layer, Layer]] | None = None) -> VmConfig:
    """The VmConfig of a ``volt run`` command line over a config file (if any) over the
    host config's [vm] defaults. ``expand(name, flags)`` turns the boot manifest a layer
    names (``--boot NAME``, or ``manifest`` in [vm]) into (manifest layer, flags layer)
    (:func:`manifest_layers`): the manifest's settings sit just below the flags."""
    flags = flags_layer(args)
    layers = [host_layer(host_config), *([file_layer] if file_layer else [])]
    name = next((la.values["manifest"] for la in (flags, *reversed(layers))
                 if la.values.get("manifest")), "")
    if name:
        if expand is None:
            raise VoltError("--boot NAME: boot manifests are not supported here yet (give "
                            "--kernel and the devices)", exitcodes.USAGE)
        manifest, flags = expand(name, flags)
        layers.append(manifest)
    return layered(*layers, flags)
