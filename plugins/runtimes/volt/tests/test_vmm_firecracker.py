"""Firecracker's config file on VmConfig: Firecracker's own test-framework config
(tests/data/firecracker_vm_config.json is tests/framework/vm_config.json of
firecracker-microvm/firecracker v1.16.1, Apache-2.0, unchanged), drives as virtio-blk or
virtio-stellar, the TOML form of the same machine, round trips, and precise errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from volt import api
from volt.vmm import config
from volt.vmm import firecracker as fc
from volt.vmm.config import DeviceSpec, Layer, VmConfig, layered

from stellarium_core import config as config_mod
from stellarium_core.errors import ConfigError

DATA = Path(__file__).parent / "data"
FC_CONFIG = DATA / "firecracker_vm_config.json"


def load(path: Path, *flags: str, host: str = "") -> VmConfig:
    """What ``volt run --config-file PATH FLAGS`` would boot, over a host [vm] table."""
    hostfile = path.parent / "host.toml"
    hostfile.write_text('[store]\npath = "store"\n' + host)
    host_cfg = config_mod.load(hostfile)
    p = argparse.ArgumentParser()
    config.add_arguments(p)
    api.add_arguments(p)
    args = p.parse_args(["--config-file", str(path), *flags])
    base = layered(config.host_layer(host_cfg))
    file_layer, _ = fc.file_layer(str(path), base)
    return config.from_args(args, host_cfg, file_layer)


def test_firecrackers_own_test_config_maps_onto_vmconfig(tmp_path: Path) -> None:
    f = tmp_path / "vm.json"
    f.write_text(FC_CONFIG.read_text())
    cfg = load(f)
    assert (cfg.kernel, cfg.cmdline, cfg.vcpus, cfg.memory_mib, cfg.hugepages) == (
        "vmlinux.bin", "console=ttyS0 reboot=k panic=1", 2, 1024, False)
    assert cfg.devices == (DeviceSpec("virtio-blk", {"path": "bionic.rootfs.ext4",
                                                     "readonly": False, "serial": "rootfs"},
                                      "rootfs"),)
    assert cfg.root == "rootfs" and cfg.root_cmdline() == " root=/dev/vda rw"


def test_flags_override_the_file_which_overrides_the_host_table(tmp_path: Path) -> None:
    f = tmp_path / "vm.json"
    f.write_text(FC_CONFIG.read_text())
    cfg = load(f, "--mem", "256", host='[vm]\nksm = true\nmemory_mib = 64\n')
    assert (cfg.memory_mib, cfg.vcpus, cfg.ksm) == (256, 2, True)


def test_stellar_drives_root_first_and_every_device_kind(tmp_path: Path) -> None:
    f = tmp_path / "vm.json"
    f.write_text(json.dumps({
        "boot-source": {"kernel_image_path": "volt-6.1", "initrd_path": None},
        "drives": [
            {"drive_id": "data", "is_root_device": False, "is_read_only": False,
             "path_on_host": "stellar:volume/vm0-data"},
            {"drive_id": "root", "is_root_device": True, "is_read_only": True,
             "path_on_host": "stellar:image/debian", "partuuid": "1234-ab"}],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                                "guest_mac": "06:00:AC:10:00:02"}],
        "vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"},
        "entropy": {"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}},
        "balloon": {"amount_mib": 16, "deflate_on_oom": True, "stats_polling_interval_s": 1},
        "stellar-devices": [{"plugin": "virtio-pmem", "id": "pm", "params": {"x": 1}}],
        "metrics": {"metrics_path": str(tmp_path / "m.json")},
        "logger": {"level": "debug"}}))
    cfg = load(f)
    assert [d.id for d in cfg.devices] == ["root", "data", "eth0", "vsock", "entropy",
                                           "balloon", "pm"]
    d = {x.id: x for x in cfg.devices}
    assert d["root"] == DeviceSpec("virtio-stellar", {"image": "debian", "readonly": True},
                                   "root")
    assert d["data"].params == {"volume": "vm0-data", "readonly": False}
    assert d["eth0"] == DeviceSpec("virtio-net", {"tap": "tap0", "mac": "06:00:AC:10:00:02"},
                                   "eth0")
    assert d["vsock"].params == {"guest_cid": 3, "uds_path": "/tmp/v.sock"}
    assert d["entropy"].params == {"bytes_per_sec": 10000}
    assert d["balloon"].params == {"amount_mib": 16, "deflate_on_oom": True,
                                   "stats_polling_interval_s": 1}
    assert cfg.root_cmdline() == " root=PARTUUID=1234-ab ro"
    # What GET /vm/config answers is a config file that boots the same machine.
    _, telemetry = fc.file_layer(str(f), VmConfig())
    again = tmp_path / "again.json"
    again.write_text(json.dumps(fc.render(cfg, telemetry)))
    assert load(again) == cfg


def test_a_vm_toml_describes_the_same_machine(tmp_path: Path) -> None:
    f = tmp_path / "vm.json"
    f.write_text(FC_CONFIG.read_text())
    t = tmp_path / "vm.toml"
    t.write_text('kernel = "vmlinux.bin"\ncmdline = "console=ttyS0 reboot=k panic=1"\n'
                 'vcpus = 2\nmemory_mib = 1024\nroot = "rootfs"\n'
                 '[[devices]]\nplugin = "virtio-blk"\nid = "rootfs"\n'
                 'params = {path = "bionic.rootfs.ext4", readonly = false, serial = "rootfs"}\n'
                 '[metrics]\nmetrics_path = "m.json"\n')
    assert load(t) == load(f)
    _, telemetry = fc.file_layer(str(t), VmConfig())
    assert telemetry.metrics == {"metrics_path": "m.json"}


def test_image_flag_is_a_readonly_stellar_root_drive(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    config.add_arguments(p)
    args = p.parse_args(["--image", "debian", "--device", "virtio-rng"])
    cfg = config.from_args(args, config_mod.parse({}))
    assert cfg.devices[0] == DeviceSpec("virtio-stellar", {"image": "debian"}, "root")
    assert cfg.root == "root" and cfg.root_cmdline() == " root=/dev/vda ro"


@pytest.mark.parametrize("doc, message", [
    ("[1]", "vm.json: expected a JSON object at the top, got an array"),
    ('{"boot-source": {"kernel_image_path": "k"},', "vm.json: line 1 column"),
    ("{}", "vm.json: boot-source: missing: a config file must say which kernel to boot"),
    ('{"boot-source": {"kernel_image_path": "k"}, "bogus": 1}',
     "vm.json: bogus: unknown section (known: boot-source, drives"),
    ('{"boot-source": {"kernel_image_path": 7}}',
     "vm.json: boot-source.kernel_image_path: expected a string, got int 7"),
    ('{"boot-source": {"kernel_image_path": "k", "boot_arg": "x"}}',
     "vm.json: boot-source.boot_arg: unknown key (known keys: kernel_image_path, boot_args"),
    ('{"boot-source": {"kernel_image_path": "k"}, "machine-config": '
     '{"vcpu_count": 2, "mem_size_mib": 4}}',
     "vm.json: machine-config.mem_size_mib: must be 8..65536 MiB, got 4"),
    ('{"boot-source": {"kernel_image_path": "k"}, "machine-config": '
     '{"vcpu_count": "2", "mem_size_mib": 64}}',
     "vm.json: machine-config.vcpu_count: expected an integer, got str '2'"),
    ('{"boot-source": {"kernel_image_path": "k"}, "machine-config": '
     '{"vcpu_count": 2, "mem_size_mib": 64, "smt": true}}',
     "machine-config.smt: Volt gives vCPUs no SMT siblings"),
    ('{"boot-source": {"kernel_image_path": "k"}, "drives": {}}',
     "vm.json: drives: expected an array, got an object"),
    ('{"boot-source": {"kernel_image_path": "k"}, "drives": [{"drive_id": "a", '
     '"is_root_device": true, "is_read_only": "no", "path_on_host": "x"}]}',
     "vm.json: drives[0].is_read_only: expected true or false, got str 'no'"),
    ('{"boot-source": {"kernel_image_path": "k"}, "drives": [{"drive_id": "a", '
     '"is_root_device": true, "is_read_only": false, "path_on_host": "stellar:image/x"}]}',
     "drives[0].is_read_only: an image's VM disk is read-only"),
    ('{"boot-source": {"kernel_image_path": "k"}, "drives": [{"drive_id": "a", '
     '"is_root_device": true, "is_read_only": false, "path_on_host": "stellar:vol/x"}]}',
     "drives[0].path_on_host: use stellar:volume/NAME or stellar:image/NAME"),
    ('{"boot-source": {"kernel_image_path": "k"}, "drives": [{"drive_id": "a", '
     '"is_root_device": true, "is_read_only": false, "path_on_host": "x", '
     '"rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}}}]}',
     "drives[0].rate_limiter: a drive has no rate limiter in Volt"),
    ('{"boot-source": {"kernel_image_path": "k"}, "drives": [{"drive_id": "a", '
     '"is_root_device": true, "is_read_only": false, "path_on_host": "x", '
     '"io_engine": "Async"}]}', "drives[0].io_engine: Volt serves drives synchronously"),
    ('{"boot-source": {"kernel_image_path": "k"}, "drives": ['
     '{"drive_id": "a", "is_root_device": true, "is_read_only": false, "path_on_host": "x"},'
     '{"drive_id": "b", "is_root_device": true, "is_read_only": false, "path_on_host": "y"}]}',
     "drives[1].is_root_device: drive 'a' is already the root device"),
    ('{"boot-source": {"kernel_image_path": "k"}, "drives": ['
     '{"drive_id": "a", "is_root_device": false, "is_read_only": false, "path_on_host": "x"},'
     '{"drive_id": "a", "is_root_device": false, "is_read_only": false, "path_on_host": "y"}]}',
     "vm.json: devices: device id 'a' is used twice"),
    ('{"boot-source": {"kernel_image_path": "k"}, "vsock": {"guest_cid": 2, "uds_path": "u"}}',
     "vm.json: vsock.guest_cid: must be at least 3, got 2"),
    ('{"boot-source": {"kernel_image_path": "k"}, "cpu-config": {"kvm_capabilities": []}}',
     "vm.json: cpu-config: Volt has no CPU templates"),
    ('{"boot-source": {"kernel_image_path": "k"}, "pmem": [{"id": "p"}]}',
     "vm.json: pmem: Volt has no virtio-pmem device yet"),
    ('{"boot-source": {"kernel_image_path": "k"}, "logger": {"level": "Loud"}}',
     "vm.json: logger.level: must be one of Error, Warning, Info, Debug, Trace, Off"),
])
def test_bad_config_files_name_file_field_and_reason(tmp_path: Path, doc: str,
                                                      message: str) -> None:
    f = tmp_path / "vm.json"
    f.write_text(doc)
    with pytest.raises(ConfigError) as err:
        load(f)
    assert message in str(err.value), str(err.value)
    assert err.value.exit_code == 2 and len(str(err.value)) < 300


def test_bad_files_are_refused_unread_or_unparsed(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (fc.MAX_FILE_BYTES + 1))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe{}")
    for path, message in ((big, "larger than 1 MiB"), (deep, "nested too deeply"),
                          (binary, "not UTF-8 text"), (tmp_path / "none.json", "No such file"),
                          (tmp_path, "Is a directory")):
        with pytest.raises(ConfigError, match=message):
            fc.file_layer(str(path), VmConfig())


def test_api_body_errors_name_the_body_field() -> None:
    cfg = VmConfig()
    with pytest.raises(ConfigError, match="^mem_size_mib: must be 8..65536 MiB, got 1$"):
        fc.with_settings(cfg, fc.machine_config({"vcpu_count": 1, "mem_size_mib": 1}))
    with pytest.raises(ConfigError, match="^vcpu_count: missing required key$"):
        fc.machine_config({"mem_size_mib": 64})
    assert fc.machine_config({"mem_size_mib": 64}, partial=True) == {"memory_mib": 64}
    with pytest.raises(ConfigError, match="^expected an object, got an array$"):
        fc.drive([])
    assert fc.api_id_problem("root_1") is None
    for bad in ("", "a-b", "../x", "é", "x" * 65):
        assert fc.api_id_problem(bad)


def test_the_root_device_rule_over_api_puts() -> None:
    cfg = VmConfig()
    root = {"drive_id": "a", "is_root_device": True, "is_read_only": False, "path_on_host": "x"}
    cfg = fc.put_drive(cfg, fc.drive(root))
    cfg = fc.put_drive(cfg, fc.drive({**root, "drive_id": "b", "is_root_device": False}))
    with pytest.raises(ConfigError, match="drive 'a' is already the root device"):
        fc.put_drive(cfg, fc.drive({**root, "drive_id": "b"}))
    cfg = fc.put_drive(cfg, fc.drive({**root, "is_root_device": False}))  # a stops being root
    assert cfg.root == "" and cfg.root_cmdline() == ""
    cfg = fc.put_drive(cfg, fc.drive({**root, "drive_id": "b"}))
    assert [d.id for d in cfg.devices] == ["b", "a"]
    net = fc.network_interface({"iface_id": "a", "host_dev_name": "tap0"})
    with pytest.raises(ConfigError, match="already names a virtio-blk device"):
        fc.put_device(cfg, net, (fc.NET,), "network interface")


def test_layer_names_a_file_setting_by_its_firecracker_name() -> None:
    with pytest.raises(ConfigError, match="^f.json: machine-config.vcpu_count: must be 1..32"):
        layered(Layer({"vcpus": 99}, "file", "f.json", fc.FILE_NAMES))


def test_the_vmm_never_imports_the_api() -> None:
    """The API drives the VMM (volt.api.launch wires them, like Firecracker's binary)."""
    import subprocess
    import sys

    code = ("import sys, volt.vmm.runner, volt.vmm.instance, volt.vmm.builder, "
            "volt.vmm.firecracker, volt.plugin; "
            "print(sorted(m for m in sys.modules if m.startswith('volt.api')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
