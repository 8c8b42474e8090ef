"""One VM model: VmConfig layers (host [vm] < flags), precise errors per source, kernels and
initrds by registry name, `volt --config` reaching devices, plugin events, and the layout
rules (the VMM never imports its CLI; device tests never import Volt)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from volt.cli import main
from volt.vmm import exitcodes
from volt.vmm.config import DeviceSpec, Layer, VmConfig, layered
from volt.vmm.exitcodes import VoltError

from stellarium_core import config as config_mod
from stellarium_core.errors import ConfigError
from stellarium_core.hookspecs import hookimpl
from stellarium_core.host import Host

sys.path.insert(0, str(Path(__file__).parent))
from tinyguest import kvm_unusable, make_elf  # noqa: E402

REPO = Path(__file__).resolve().parents[4]
needs_kvm = pytest.mark.skipif(kvm_unusable() is not None, reason=str(kvm_unusable()))
#: 16 NOPs, then at the PVH entry (+16): mov al, 0xfe; out 0x64, al (i8042 reset); hlt;
#: and the banner the kernel registry looks for.
RESET_ELF = make_elf(body=b"\x90" * 16 + bytes.fromhex("b0fee664f4")
                     + b"Linux version 6.1.0-tiny\0")


@pytest.fixture
def host_cfg(tmp_path: Path) -> Path:
    """An initialised host whose [vm] table sets defaults."""
    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n[vm]\nmemory_mib = 64\nvcpus = 2\n'
                   'cmdline = "console=ttyS0 quiet"\n')
    from stellarium_core.cli import main as stellar

    assert stellar(["--config", str(cfg), "host", "init"]) == 0
    return cfg


@pytest.fixture
def reset_kernel(tmp_path: Path) -> Path:
    p = tmp_path / "vmlinux"
    p.write_bytes(RESET_ELF)
    return p


#: A VM booted inside the pytest process cannot confine it (seccomp would kill pytest);
#: confinement has its own tests, out of process (test_jail_*.py).
IN_PROCESS = ("--landlock=off", "--seccomp=off")


def volt(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def test_flags_override_the_host_vm_table_key_by_key(host_cfg: Path) -> None:
    import argparse

    from volt.vmm import config
    p = argparse.ArgumentParser()
    config.add_arguments(p)
    args = p.parse_args(["--vcpus", "1", "--device", "virtio-stellar,volume=a",
                         "--no-hugepages"])
    cfg = config.from_args(args, config_mod.load(host_cfg))
    assert (cfg.memory_mib, cfg.vcpus, cfg.cmdline) == (64, 1, "console=ttyS0 quiet")
    assert cfg.devices == (DeviceSpec("virtio-stellar", {"volume": "a"}, "virtio-stellar0"),)
    assert cfg.hugepages is False and cfg.kernel == ""


def test_devices_from_tables_get_ids_and_round_trip() -> None:
    cfg = VmConfig(devices=({"plugin": "virtio-rng"},
                            {"plugin": "virtio-stellar", "id": "root",
                             "params": {"volume": "r"}}))
    assert [d.id for d in cfg.devices] == ["virtio-rng0", "root"]
    assert VmConfig(**{**cfg.to_dict()}) == cfg


@pytest.mark.parametrize("layer, message", [
    (Layer({"vcpus": 0}, "flags"), "--vcpus 0: must be 1..32, got 0"),
    (Layer({"memory_mib": 7}, "host", "/h.toml"), "/h.toml: vm.memory_mib: must be 8..65536"),
    (Layer({"memory_mib": "7"}, "spec"), "memory_mib: expected an integer, got str '7'"),
    (Layer({"mem": 64}, "host", "/h.toml"), "/h.toml: vm.mem: unknown key (known keys: kernel"),
    (Layer({"serial": "tty"}, "flags"), "--serial tty: use stdout, none, file:PATH"),
    (Layer({"boot": "efi"}, "flags"), "--boot efi: must be one of auto, linux64, pvh"),
    (Layer({"hugepages": True, "memory_mib": 65}, "flags"),
     "--mem 65: must be a multiple of 2 MiB with huge pages"),
    (Layer({"hugepages": True, "ksm": True}, "flags"), "--ksm: KSM cannot merge huge pages"),
    (Layer({"devices": [DeviceSpec("a", {}, "x"), DeviceSpec("b", {}, "x")]}, "flags"),
     "--device: device id 'x' is used twice"),
    (Layer({"devices": [{"plugin": "a", "id": "../x"}]}, "spec"), "devices: device id '../x'"),
    (Layer({"devices": "virtio-rng"}, "spec"), "devices: expected a list of devices"),
    (Layer({"cmdline": "x" * 3000}, "flags"), "--cmdline xxxxxxxx"),
])
def test_bad_values_name_their_source(layer: Layer, message: str) -> None:
    with pytest.raises((VoltError, ConfigError)) as err:
        layered(Layer({}, "host", "/h.toml"), layer)
    assert message in str(err.value)
    if layer.kind == "flags":
        assert isinstance(err.value, VoltError)
    else:
        assert isinstance(err.value, ConfigError) and err.value.exit_code == 2
    assert len(str(err.value)) < 300


def test_cli_reports_bad_vm_table_and_bad_flags_with_exit_codes(
        host_cfg: Path, reset_kernel: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = host_cfg.parent / "bad.toml"
    bad.write_text(host_cfg.read_text() + "ksm = 3\n")
    code, err = volt(capsys, "--config", str(bad), "run", "--kernel", str(reset_kernel))
    assert code == 2 and f"{bad}: vm.ksm: expected true or false, got int 3" in err
    code, err = volt(capsys, "--config", str(host_cfg), "run", "--kernel", str(reset_kernel),
                     "--vcpus", "99")
    assert code == exitcodes.USAGE and "--vcpus 99: must be 1..32" in err


def test_unknown_device_params_are_a_device_error(host_cfg: Path, reset_kernel: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, err = volt(capsys, "--config", str(host_cfg), "run", "--kernel", str(reset_kernel),
                     "--device", f"virtio-stellar,volume=x,config={host_cfg}")
    assert code == exitcodes.DEVICE
    assert "device virtio-stellar0 (virtio-stellar): params.config: unknown key" in err


def test_unknown_kernel_or_initrd_name_is_a_precise_error(
        host_cfg: Path, reset_kernel: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = ["--config", str(host_cfg), "run"]
    code, err = volt(capsys, *c, "--kernel", "no-such-kernel")
    assert code == exitcodes.KERNEL
    assert "kernel 'no-such-kernel': no such file, and the kernel registry says: no kernel " \
           "named or hashed 'no-such-kernel' (see `volt kernel list`)" in err
    assert volt(capsys, "--config", str(host_cfg), "kernel", "import", str(reset_kernel),
                "--name", "tiny")[0] == 0
    code, err = volt(capsys, *c, "--kernel", "tiny", "--initrd", "tiny")
    assert code == exitcodes.INITRD and "kernel tiny has no initrd (it has: vmlinux)" in err
    code, err = volt(capsys, *c, "--kernel", "tiny", "--boot", "linux64", "--initrd",
                     str(host_cfg.parent / "nope.img"))
    assert code == exitcodes.INITRD and "No such file" in err


def test_no_kernel_anywhere_is_a_kernel_error(host_cfg: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, err = volt(capsys, "--config", str(host_cfg), "run")
    assert code == exitcodes.KERNEL and "no kernel: give --kernel PATH|NAME" in err


@needs_kvm
def test_kernel_and_initrd_by_name_from_the_registry_boot(
        host_cfg: Path, reset_kernel: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"07070100" * 512)
    c = ["--config", str(host_cfg)]
    assert volt(capsys, *c, "kernel", "import", str(reset_kernel), "--name", "tiny",
                "--initrd", str(initrd))[0] == 0
    assert volt(capsys, *c, "kernel", "import", "--initrd", str(initrd),
                "--name", "just-initrd")[0] == 0
    reset_kernel.unlink()                     # only NEBULA has the kernel now
    code, err = volt(capsys, *c, "run", "--kernel", "tiny", "--initrd", "just-initrd",
                     "--serial", "none", *IN_PROCESS)
    assert code == 0, err
    # The [vm] table can name the kernel too, and a digest prefix selects that image.
    from volt.kernels import registry

    digest = registry.find(Host.from_config(host_cfg), "tiny").images["vmlinux"]["digest"]
    cfg2 = host_cfg.parent / "named.toml"
    cfg2.write_text(host_cfg.read_text() + f'kernel = "{digest[:12]}"\nserial = "none"\n')
    code, err = volt(capsys, "--config", str(cfg2), "run", *IN_PROCESS)
    assert code == 0, err


@needs_kvm
def test_volt_config_reaches_devices_and_plugins_hear_instance_events(
        host_cfg: Path, reset_kernel: Path, tmp_path: Path) -> None:
    from volt.vmm.runner import launch

    from stellarium_core.volumes.volume import VolumeStore

    host = Host.from_config(host_cfg)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 65536)
    VolumeStore(host.store_path / "volumes", host.store, host.hasher).import_raw(
        "data", raw).close()
    events: list[tuple] = []

    class Listener:
        @hookimpl
        def stellarium_instance_started(self, runtime: str, instance: str, info: dict) -> None:
            events.append(("started", runtime, instance, info["devices"]))

        @hookimpl
        def stellarium_instance_stopped(self, runtime: str, instance: str,
                                        exit_code: int) -> None:
            events.append(("stopped", runtime, instance, exit_code))

    host.registry.pm.register(Listener())
    cfg = layered(Layer({"kernel": str(reset_kernel), "serial": "none",
                         "devices": [DeviceSpec("virtio-stellar", {"volume": "data"}, "d")]},
                        "spec"))
    # The device opens "data" from this host's store: no config= key reaches it.
    assert launch(cfg, host) == 0
    assert [e[:2] for e in events] == [("started", "volt"), ("stopped", "volt")]
    assert events[0][2] == events[1][2] and events[0][3] == ["d"] and events[1][3] == 0


def test_the_vmm_never_imports_its_cli() -> None:
    code = ("import sys, volt.vmm.__main__, volt.vmm.runner, volt.vmm.builder, volt.plugin; "
            "print(sorted(m for m in sys.modules if m.startswith('volt.cli')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_device_plugin_tests_never_import_volt() -> None:
    tests = sorted((REPO / "plugins" / "devices").glob("*/tests/*.py"))
    assert tests
    for path in tests:
        bad = re.findall(r"^\s*(?:from|import)\s+volt\b.*$", path.read_text(), re.M)
        assert not bad, f"{path}: {bad}"
