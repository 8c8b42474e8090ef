"""Kernel management: config fragment checks, format detection, the NEBULA-backed registry,
and the built guest kernel booting to the smoke initramfs's marker."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from volt.cli import main
from volt.kernels.build import FRAGMENT, check_config, fragment_options
from volt.kernels.formats import NotAKernelError, inspect
from volt.kernels.initramfs import SMOKE_MARKER
from volt.lab.image import find_kernel

from stellarium_core.errors import StellarError

DEBIAN_KERNEL = find_kernel()
needs_debian_kernel = pytest.mark.skipif(DEBIAN_KERNEL is None,
                                         reason="no Debian vmlinuz-*-amd64 in /boot")
QEMU = shutil.which("qemu-system-x86_64")

#: What issue 5 asks the guest kernel to contain.
REQUIRED = ["CONFIG_VIRTIO_MMIO", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES", "CONFIG_VIRTIO_BLK",
            "CONFIG_VIRTIO_NET", "CONFIG_VIRTIO_VSOCKETS", "CONFIG_HW_RANDOM_VIRTIO",
            "CONFIG_VIRTIO_PMEM", "CONFIG_DAX", "CONFIG_FS_DAX", "CONFIG_EXT4_FS",
            "CONFIG_EROFS_FS", "CONFIG_SQUASHFS", "CONFIG_OVERLAY_FS",
            "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_PVH", "CONFIG_KVM_GUEST"]


def test_fragment_asks_for_the_microvm_options() -> None:
    opts = fragment_options()
    assert {k: opts.get(k) for k in REQUIRED} == dict.fromkeys(REQUIRED, "y")
    assert opts["CONFIG_MODULES"] == "n"


def test_config_check_names_every_option_the_build_lost(tmp_path: Path) -> None:
    text = FRAGMENT.read_text().replace("CONFIG_EROFS_FS=y", "# CONFIG_EROFS_FS is not set")
    text = text.replace("CONFIG_PVH=y\n", "")
    (tmp_path / ".config").write_text(text)
    with pytest.raises(StellarError) as err:
        check_config(tmp_path / ".config")
    assert "CONFIG_EROFS_FS=y (got n)" in str(err.value)
    assert "CONFIG_PVH=y (got n)" in str(err.value)
    assert "CONFIG_EXT4_FS" not in str(err.value)


def _elf_header(machine: int, e_type: int = 2) -> bytes:
    hdr = bytearray(64)
    hdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<HH", hdr, 16, e_type, machine)
    return bytes(hdr)


@pytest.mark.parametrize("content, message", [
    (b"just some text\n" * 100, "not a Linux kernel: neither"),
    (_elf_header(183), "machine 183, not x86-64"),
    (_elf_header(62, e_type=3), "not an executable"),
    (_elf_header(62) + b"\0" * 64, "no 'Linux version' banner"),
    (b"", "not a Linux kernel"),
])
def test_inspect_rejects_non_kernels(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "file"
    path.write_bytes(content)
    with pytest.raises(NotAKernelError, match=message):
        inspect(path)


@needs_debian_kernel
def test_inspect_debian_bzimage_and_a_truncated_copy(tmp_path: Path) -> None:
    assert DEBIAN_KERNEL is not None
    info = inspect(DEBIAN_KERNEL)
    assert info.format == "bzimage" and info.entry64
    assert info.version == DEBIAN_KERNEL.name.removeprefix("vmlinuz-")
    assert tuple(map(int, info.boot_protocol.split("."))) >= (2, 12)
    cut = tmp_path / "cut"
    cut.write_bytes(DEBIAN_KERNEL.read_bytes()[:200_000])
    with pytest.raises(NotAKernelError, match="truncated bzImage"):
        inspect(cut)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "host.toml"
    path.write_text('[store]\npath = "store"\n')
    from stellarium_core.cli import main as stellar

    assert stellar(["--config", str(path), "host", "init"]) == 0
    return path


def _volt_json(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_import_of_a_non_kernel_is_refused_and_stores_nothing(
        config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("hello\n" * 1000)
    packs = config.parent / "store" / "nebula" / "packs"
    before = sorted(p.stat().st_size for p in packs.iterdir())
    assert main(["--config", str(config), "kernel", "import", str(junk)]) == 2
    err = capsys.readouterr().err
    assert "is not a Linux kernel" in err and "Traceback" not in err
    assert _volt_json(capsys, "--config", str(config), "kernel", "list") == []
    assert sorted(p.stat().st_size for p in packs.iterdir()) == before


@needs_debian_kernel
def test_import_list_show_verify_and_remove(config: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert DEBIAN_KERNEL is not None
    c = ["--config", str(config)]
    rec = _volt_json(capsys, *c, "kernel", "import", str(DEBIAN_KERNEL), "--name", "debian")
    assert rec["formats"] == ["bzImage"] and rec["version"] == inspect(DEBIAN_KERNEL).version
    listed = _volt_json(capsys, *c, "kernel", "list")
    assert [r["name"] for r in listed] == ["debian"]
    digest = rec["digests"]["bzImage"]
    shown = _volt_json(capsys, *c, "kernel", "show", digest[:12], "--extract",
                       str(tmp_path / "out"))
    assert shown["name"] == "debian" and shown["images"]["bzImage"]["verified"] is True
    assert (tmp_path / "out" / "bzImage").read_bytes() == DEBIAN_KERNEL.read_bytes()
    assert _volt_json(capsys, *c, "kernel", "rm", "debian") == {"removed": "debian"}
    assert main([*c, "kernel", "show", "debian"]) == 1
    assert "no kernel named or hashed 'debian'" in capsys.readouterr().err


@pytest.mark.slow
def test_guest_kernel_is_built_registered_and_verifiable(
        guest_kernel, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The build (cached across runs) gives a PVH-capable ELF and a 64-bit bzImage whose
    .config honours the fragment; registering stores both and reads them back intact."""
    vm, bz = inspect(guest_kernel.vmlinux), inspect(guest_kernel.bzimage)
    assert (vm.format, vm.pvh) == ("elf", True)
    assert (bz.format, bz.entry64) == ("bzimage", True)
    assert vm.version == bz.version == guest_kernel.kernel_release
    check_config(guest_kernel.config)
    from volt.kernels import registry

    from stellarium_core.host import Host

    rec = registry.register_build(Host.from_config(config), guest_kernel)
    shown = _volt_json(capsys, "--config", str(config), "kernel", "show", rec.name, "--verify")
    assert shown["config_hash"] == guest_kernel.fragment_hash
    assert {k: v["verified"] for k, v in shown["images"].items()} == {
        "vmlinux": True, "bzImage": True}


def _microvm(kernel: Path, initrd: Path, *accel: str) -> list[str]:
    return ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on",
            *accel, "-m", "256", "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 reboot=t panic=-1 quiet"]


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
@pytest.mark.parametrize("image", ["bzimage", "vmlinux"])
def test_guest_kernel_boots_smoke_initramfs_under_tcg(guest_kernel, smoke_initramfs,
                                                      image: str) -> None:
    """Both formats reach the smoke /init (QEMU TCG, no KVM needed), which prints the
    marker and reboots so QEMU exits by itself."""
    kernel = getattr(guest_kernel, image)
    proc = subprocess.run(_microvm(kernel, smoke_initramfs, "-accel", "tcg"),
                          capture_output=True, text=True, timeout=180)
    assert SMOKE_MARKER in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"VOLT-INIT-KERNEL {guest_kernel.kernel_release} CPUS 1" in proc.stdout


@pytest.mark.lab
@pytest.mark.slow
def test_guest_kernel_boots_under_real_kvm_in_the_lab(lab, guest_kernel, smoke_initramfs) -> None:
    """The peer baseline: QEMU -M microvm with -enable-kvm inside the lab boots the guest
    kernel to the marker (three boots, timed, in one lab run)."""
    cmd = _microvm(guest_kernel.bzimage, smoke_initramfs, "-enable-kvm", "-cpu", "host")
    script = (
        "import subprocess, sys, time, json\n"
        f"cmd = {cmd!r}\n"
        "out = []\n"
        "for _ in range(3):\n"
        "    t = time.monotonic()\n"
        "    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)\n"
        f"    out.append([time.monotonic() - t, {SMOKE_MARKER!r} in p.stdout])\n"
        "print(json.dumps(out))\n")
    started = time.monotonic()
    res = lab.run([sys.executable, "-c", script], timeout=300)
    assert res.returncode == 0, res.stderr
    boots = json.loads(res.stdout)
    assert [ok for _, ok in boots] == [True, True, True]
    print(f"\nQEMU microvm + KVM in the lab: boots to {SMOKE_MARKER} in "
          f"{', '.join(f'{s:.2f}s' for s, _ in boots)}; whole lab run "
          f"{time.monotonic() - started:.1f}s")
