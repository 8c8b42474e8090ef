"""Bad input to ``volt run``: each kind gets a clear one-line message and its own exit code."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from volt.cli import main
from volt.vmm import exitcodes

sys.path.insert(0, str(Path(__file__).parent))
from tinyguest import kvm_unusable, make_elf  # noqa: E402


@pytest.fixture
def fake_kernel(tmp_path: Path) -> Path:
    """A well-formed x86-64 ELF whose segment sits at 16 MiB, like a vmlinux."""
    p = tmp_path / "vmlinux"
    p.write_bytes(make_elf())
    return p


def volt_run(capsys, *args: str) -> tuple[int, str]:
    code = main(["run", *args])
    err = capsys.readouterr().err
    return code, err


def test_missing_kernel(capsys, tmp_path):
    code, err = volt_run(capsys, "--kernel", str(tmp_path / "nope"))
    assert code == exitcodes.KERNEL
    assert "No such file" in err and "Traceback" not in err


def test_invalid_kernel(capsys, tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"MZ" + bytes(8190))
    code, err = volt_run(capsys, "--kernel", str(junk))
    assert code == exitcodes.KERNEL
    assert "neither an ELF vmlinux nor a bzImage" in err


def test_memory_below_minimum(capsys, fake_kernel):
    code, err = volt_run(capsys, "--kernel", str(fake_kernel), "--mem", "4")
    assert code == exitcodes.MEMORY and "--mem 4" in err


@pytest.mark.skipif(kvm_unusable() is not None, reason=str(kvm_unusable()))
def test_memory_too_small_for_kernel(capsys, fake_kernel):
    code, err = volt_run(capsys, "--kernel", str(fake_kernel), "--mem", "8")
    assert code == exitcodes.MEMORY
    assert "too small" in err


def test_cmdline_too_long(capsys, fake_kernel):
    code, err = volt_run(capsys, "--kernel", str(fake_kernel), "--cmdline", "x" * 5000)
    assert code == exitcodes.CMDLINE
    assert "command line is" in err


def test_unknown_device(capsys, fake_kernel):
    code, err = volt_run(capsys, "--kernel", str(fake_kernel), "--device", "warp-drive,speed=9")
    assert code == exitcodes.DEVICE
    assert "warp-drive" in err


def test_bad_device_option_syntax(capsys, fake_kernel):
    code, err = volt_run(capsys, "--kernel", str(fake_kernel), "--device", "blk,oops")
    assert code == exitcodes.DEVICE and "key=value" in err


def test_missing_initrd(capsys, fake_kernel, tmp_path):
    code, err = volt_run(capsys, "--kernel", str(fake_kernel), "--initrd", str(tmp_path / "x"))
    assert code == exitcodes.INITRD and "initrd" in err


def test_exit_codes_are_distinct_and_documented(capsys):
    codes = [c for c, _ in exitcodes.TABLE]
    assert len(codes) == len(set(codes))
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for code, text in exitcodes.TABLE:
        assert f"{code:>3}  {text}" in out


def _free_hugepages() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(kvm_unusable() is not None, reason=str(kvm_unusable()))
@pytest.mark.skipif(_free_hugepages() >= 64, reason="enough huge pages are free here to "
                    "back 128 MiB, so the shortage cannot be provoked")
def test_huge_page_shortage_fails_at_start_with_its_exit_code(capsys, fake_kernel):
    code, err = volt_run(capsys, "--kernel", str(fake_kernel), "--mem", "128", "--hugepages")
    assert code == exitcodes.MEMORY
    assert "cannot reserve 128 MiB of guest memory in 2 MiB huge pages" in err
    assert "nr_hugepages" in err and "Traceback" not in err
