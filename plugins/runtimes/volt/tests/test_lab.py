"""The nested KVM lab: exit codes and output come back, runs are isolated, nothing hangs."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from volt.cli import main
from volt.kernels.initramfs import Archive
from volt.lab import LabError, LabWedged, LabWedgeWarning
from volt.lab.image import find_kernel, module_order


def test_cli_run_needs_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "run"]) == 2
    assert "give the command after --" in capsys.readouterr().err


@pytest.mark.skipif(find_kernel() is None, reason="no Debian generic kernel in /boot")
def test_module_order_puts_dependencies_first() -> None:
    kernel = find_kernel()
    assert kernel is not None
    names = [p.name.split(".ko")[0] for p in module_order(kernel.name.removeprefix("vmlinuz-"))]
    for before, after in [("ccp", "kvm-amd"), ("kvm", "kvm-amd"), ("irqbypass", "kvm"),
                          ("virtio_ring", "virtio"), ("virtio", "virtio_pci"),
                          ("9pnet", "9pnet_virtio"), ("9pnet_virtio", "9p")]:
        assert names.index(before) < names.index(after), names
    assert "overlay" in names


def test_cpio_archive_is_readable_by_cpio(tmp_path: Path) -> None:
    arc = Archive()
    arc.file("a/b/file.txt", b"hello", 0o600)
    arc.symlink("a/link", "b/file.txt")
    arc.chardev("dev/console", 5, 1)
    out = arc.write(tmp_path / "x.cpio")
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=out.read_bytes(),
                             capture_output=True, check=True).stdout.decode()
    assert "a/b/file.txt" in listing and "a/link -> b/file.txt" in listing
    assert "5,   1" in listing or "5, 1" in listing
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames", "a/b/file.txt"],
                   input=out.read_bytes(), cwd=tmp_path, check=True)
    assert (tmp_path / "a/b/file.txt").read_bytes() == b"hello"


@pytest.mark.lab
def test_parallel_runs_keep_exit_codes_and_outputs_apart(lab, tmp_path: Path) -> None:
    """Two guests at once: each gets its own exit code and streams; the host's /tmp is
    visible, guest writes reach the host only inside a ``writable`` share."""
    (tmp_path / "input.txt").write_text("from-host\n")
    share = tmp_path / "share"
    share.mkdir()
    runs = [
        (["sh", "-c", "echo out-A; echo err-A >&2; exit 3"], []),
        (["sh", "-c", "cat input.txt; echo guest > written.txt && cat written.txt; "
                      "echo kept > share/kept.txt; test -c /dev/kvm && echo kvm-yes"], [share]),
    ]
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda r: lab.run(r[0], cwd=tmp_path, writable=r[1], timeout=240), runs)
    assert (a.returncode, a.stdout, a.stderr) == (3, "out-A\n", "err-A\n")
    assert (b.returncode, b.stdout) == (0, "from-host\nguest\nkvm-yes\n"), b.stderr
    assert not (tmp_path / "written.txt").exists()
    assert (share / "kept.txt").read_text() == "kept\n"


def test_writable_share_must_be_a_directory(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "run", "--writable", str(tmp_path / "nope"), "--", "true"]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.lab
def test_timeout_kills_the_guest_with_a_clear_error(lab) -> None:
    with pytest.raises(LabError, match="timed out after 2s and was killed"):
        lab.run(["sleep", "600"], timeout=2)


@pytest.mark.lab
def test_a_wedged_l1_is_killed_and_the_command_run_again(lab, tmp_path: Path) -> None:
    """Stopping L1's heartbeat looks, from the host, exactly like an L1 that wedged: the
    first attempt is killed once no beat came for ``wedge_after`` seconds, and the second
    (which leaves the heartbeat alone) runs the command to its end."""
    script = (f"if [ ! -e {tmp_path}/first ]; then touch {tmp_path}/first; "
              "pkill -STOP -f 'volt-lab-heart[b]eat'; sleep 600; fi; echo second")
    with pytest.warns(LabWedgeWarning, match=r"wedged: no heartbeat for \d+s .*attempt 2 of 2"):
        res = lab.run(["sh", "-c", script], writable=[tmp_path], timeout=300, wedge_after=20)
    assert (res.returncode, res.stdout) == (0, "second\n"), res.stderr
    (tmp_path / "first").unlink()
    with pytest.raises(LabWedged, match=r"no heartbeat for \d+s \(last one at L1 uptime [\d.]+s\)"):
        lab.run(["sh", "-c", script], writable=[tmp_path], timeout=300, wedge_after=20,
                wedge_retries=0)


def test_watchdog_dumps_where_a_still_running_command_is(tmp_path: Path) -> None:
    """The lab's watchdog job (started by cmd.sh when the timeout allows) names the
    command's process with each thread's state; run here with a one-second delay."""
    from volt.lab import _watchdog

    script = f"{_watchdog(1)}\nexec sleep 3\n"
    # errors="replace": the dump includes every process's command line, bytes as they are.
    res = subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                         errors="replace", timeout=30)
    assert "volt lab watchdog: still running after 1s" in res.stderr, res.stderr[-2000:]
    assert "(sleep): sleep 3" in res.stderr, res.stderr[-2000:]
    assert "  task " in res.stderr
