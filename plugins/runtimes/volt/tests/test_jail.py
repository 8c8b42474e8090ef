"""``volt jail`` for real: a tiny guest's VMM in a chroot, namespaces, cgroups, own uid.

The VMM is inspected from outside through /proc while its guest idles, then
stopped with SIGTERM through the jailer. Bad input (existing jail, root or
invalid ids, a jailer without the capabilities to drop privileges, malformed
limits) is refused before anything is created.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tinyguest import kvm_unusable, make_elf  # noqa: E402

VOLT = str(Path(sys.executable).with_name("volt"))
UID = GID = 54321
#: 32-bit PVH code: print "R\n" on COM1, then sti; hlt forever (idle, not halted dead).
IDLE = bytes.fromhex("66baf803" "b052" "ee" "b00a" "ee" "fb" "f4" "ebfd")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the jailer needs root")
needs_kvm = pytest.mark.skipif(kvm_unusable() is not None, reason=str(kvm_unusable()))


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "idle.elf"
    k.write_bytes(make_elf(body=IDLE, pvh=0x1000000))
    k.chmod(0o644)
    return k


def jail(base: Path, *args: str, vm_id: str = "vm-1", uid: int = UID,
         prefix: tuple[str, ...] = ()) -> list[str]:
    return [*prefix, VOLT, "jail", "--id", vm_id, "--uid", str(uid), "--gid", str(GID),
            "--chroot-base-dir", str(base), *args]


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


@needs_root
@needs_kvm
def test_jailed_vmm_is_chrooted_namespaced_limited_and_unprivileged(tmp_path, kernel):
    base = tmp_path / "jails"
    netns = f"volt-test-{os.getpid()}"
    leak = tmp_path / "leaked-fd"
    leak.write_text("an fd the jailer must close")
    subprocess.run(["ip", "netns", "add", netns], check=True)
    proc = None
    try:
        proc = subprocess.Popen(
            jail(base, "--cgroup", "memory.max=256M", "--cgroup", "pids.max=64",
                 "--cgroup", "cpu.max=50000 100000", "--resource-limit", "fsize=67108864",
                 "--netns", f"/run/netns/{netns}",
                 "--", "--kernel", str(kernel), "--mem", "32"),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            pass_fds=[os.open(leak, os.O_RDONLY)])
        assert proc.stdout.read(2) == "R\n"         # the guest runs
        pid = int((base / "volt/vm-1/volt.pid").read_text())
        st = _status(pid)
        assert st["Uid"].split() == [str(UID)] * 4 and st["Gid"].split() == [str(GID)] * 4
        assert st["Groups"].strip() == ""
        assert int(st["CapEff"], 16) == 0 and st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
        assert os.readlink(f"/proc/{pid}/root") == "/"          # not our root: chrooted
        assert os.stat(f"/proc/{pid}/root/idle.elf").st_ino == kernel.stat().st_ino  # linked
        assert not os.path.exists(f"/proc/{pid}/root/etc/shadow")
        assert os.stat(f"/proc/{pid}/root/dev/kvm").st_uid == UID
        for ns in ("mnt", "pid", "ipc", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino
        # The environment is cleaned: only HOME, the jail's root (no host config here).
        assert Path(f"/proc/{pid}/environ").read_bytes() == b"HOME=/\0"
        assert sorted(map(int, os.listdir(f"/proc/{pid}/fd")))[:3] == [0, 1, 2]
        fds = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert str(leak) not in fds                             # the inherited fd was closed
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert "Max open files            2048" in limits
        assert "Max file size             67108864" in limits
        written = _cgroup_values(pid)
        assert written["pids.max"] == "64"
        assert written.get("memory.max", written.get("memory.limit_in_bytes")) == "268435456"
        assert written.get("cpu.max", written.get("cpu.cfs_quota_us", "")).split()[0] == "50000"
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err
        assert "volt: confined: landlock" in err and "seccomp kill" in err
        assert not _cgroup_dirs_of("vm-1"), "the jailer removes the VM's cgroups"
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "delete", netns], check=False)


def _cgroup_dirs_of(vm_id: str) -> list[Path]:
    roots = [Path(line.split()[1]) for line in Path("/proc/self/mounts").read_text().splitlines()
             if line.split()[2] in ("cgroup", "cgroup2")]
    return [d for r in roots for d in r.glob(f"**/volt/{vm_id}")]


def _cgroup_values(pid: int) -> dict[str, str]:
    """The limit files of every cgroup the process is in (v1 or v2)."""
    out = {}
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _id, ctrls, path = line.split(":", 2)
        for m in mounts:
            v2 = m[2] == "cgroup2" and ctrls == ""
            if v2 or (m[2] == "cgroup" and ctrls and set(ctrls.split(",")) <= set(m[3].split(","))):
                d = Path(m[1]) / path.lstrip("/")
                for name in ("pids.max", "memory.max", "memory.limit_in_bytes", "cpu.max",
                             "cpu.cfs_quota_us"):
                    if (d / name).exists() and "volt" in path:
                        out[name] = (d / name).read_text().strip()
    return out


@needs_root
@needs_kvm
def test_api_client_paths_stay_inside_the_jail(tmp_path, kernel):
    """``volt jail -- --api-sock /api.sock``: the API lives in the jail's root, and every
    path a client names is looked up there. A path climbing out with .., an absolute host
    path and a symlink planted in the root all miss the kernel outside; the one inside boots."""
    from apiclient import Api, wait_for_socket

    base = tmp_path / "jails"
    proc = subprocess.Popen(jail(base, "--", "--api-sock", "/api.sock", "--mem", "32"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = base / "volt/vm-1/root"
    try:
        wait_for_socket(str(root / "api.sock"), proc)
        assert os.stat(root / "api.sock").st_uid == UID
        os.symlink(str(kernel), root / "planted")
        api = Api(str(root / "api.sock"))
        for path in ("../" * 12 + str(kernel).lstrip("/"), str(kernel), "/planted"):
            assert api.call("PUT", "/boot-source", {"kernel_image_path": path}) == (204, None)
            status, body = api.call("PUT", "/actions", {"action_type": "InstanceStart"})
            assert status == 400 and "no such file" in body["fault_message"].lower(), body
            assert api.call("GET", "/")[1]["state"] == "Not started"
        shutil.copy(kernel, root / "idle.elf")
        assert api.call("PUT", "/boot-source", {"kernel_image_path": "/idle.elf"}) == (204, None)
        assert api.call("PUT", "/actions", {"action_type": "InstanceStart"}) == (204, None)
        assert api.call("GET", "/")[1]["state"] == "Running"
        api.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err.decode(errors="replace")[-2000:]


@needs_root
@pytest.mark.parametrize("args, why", [
    (["--api-sock", "/run/api.sock"], "give /NAME, a socket in the jail's root"),
    (["--api-sock", "/x", "--config-file", "vm.json"], "--config-file is not supported"),
])
def test_jail_api_options_are_checked_first(tmp_path, args, why):
    res = subprocess.run(jail(tmp_path / "jails", "--", *args), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and why in res.stderr, res.stderr
    assert not (tmp_path / "jails").exists()


@needs_root
@needs_kvm
def test_daemonized_jail_returns_and_the_vmm_keeps_running(tmp_path, kernel):
    base = tmp_path / "jails"
    res = subprocess.run(jail(base, "--daemonize", "--", "--kernel", str(kernel), "--mem", "32"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    pid = int((base / "volt/vm-1/volt.pid").read_text())
    assert f"runs as pid {pid}" in res.stdout
    try:
        deadline = time.monotonic() + 60
        while _status(pid)["Uid"].split()[0] != str(UID):   # the jailer returned at fork
            assert time.monotonic() < deadline, "the VMM never dropped to its uid"
            time.sleep(0.1)
        for fd in (0, 1, 2):                                     # detached: stdio is null
            assert os.stat(f"/proc/{pid}/fd/{fd}").st_rdev == os.makedev(1, 3)
        assert os.getsid(pid) == pid                             # its own session
    finally:
        os.kill(pid, signal.SIGKILL)


@needs_root
def test_an_existing_jail_directory_is_refused_and_kept(tmp_path, kernel):
    base = tmp_path / "jails"
    (base / "volt/vm-1/root").mkdir(parents=True)
    keep = base / "volt/vm-1/root/state"
    keep.write_text("left by an earlier VM")
    res = subprocess.run(jail(base, "--", "--kernel", str(kernel)), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 1
    assert "jail directory" in res.stderr and "already exists" in res.stderr, res.stderr
    assert keep.read_text() == "left by an earlier VM"


@pytest.mark.parametrize("uid,why", [(0, "would keep root"), (2**32 - 1, "not a valid uid")])
def test_root_or_invalid_uids_are_refused(tmp_path, kernel, uid, why):
    res = subprocess.run(jail(tmp_path, "--", "--kernel", str(kernel), uid=uid),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and why in res.stderr, res.stderr
    assert not (tmp_path / "volt").exists()


@needs_root
def test_a_jailer_that_cannot_drop_privileges_says_so(tmp_path, kernel):
    if shutil.which("capsh") is None:
        pytest.skip("capsh is not installed (apt-get install libcap2-bin)")
    cmd = jail(tmp_path, "--", "--kernel", str(kernel))
    res = subprocess.run(["capsh", "--drop=cap_setuid,cap_setgid", "--", "-c",
                          " ".join(f"'{c}'" for c in cmd)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1, res.stderr
    assert f"cannot drop to uid {UID}" in res.stderr and "CAP_SETUID" in res.stderr, res.stderr
    assert not (tmp_path / "volt").exists()


@pytest.mark.parametrize("args,why", [
    (["--id", "../escape"], "letters, digits and hyphens"),
    (["--cgroup", "memory"], "CONTROLLER.FILE=VALUE"),
    (["--resource-limit", "cores=1"], "no-file=N or fsize=N"),
    (["--resource-limit", "fsize=1048576"], "smaller than the guest memory (128 MiB)"),
    (["--netns", "/nonexistent/netns"], "no such network namespace"),
    (["--", "--mem", "32"], "no kernel (give --kernel"),
    (["--", "--kernel", "/nonexistent/vmlinux"], "/nonexistent/vmlinux: no such file"),
])
def test_malformed_jail_options_are_refused_before_anything_is_made(tmp_path, kernel, args,
                                                                     why):
    run_args = [] if "--" in args else ["--", "--kernel", str(kernel)]
    res = subprocess.run(jail(tmp_path, *args, *run_args), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and why in res.stderr, res.stderr
    assert not (tmp_path / "volt").exists()
