"""Self-confinement: what happens without Landlock, the API thread kind, the filters' shape.

Confinement is irreversible, so every case runs in a child process. A kernel
without Landlock is made for real: a parent seccomp filter answers the three
Landlock syscalls with ENOSYS, exactly what an older kernel does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from volt.jail import seccomp
from volt.jail.policy import Policy

sys.path.insert(0, str(Path(__file__).parent))
from tinyguest import kvm_unusable, make_elf  # noqa: E402

VOLT = str(Path(sys.executable).with_name("volt"))
#: 32-bit PVH code: "Hi\n" on COM1, then reset through the i8042.
HELLO = bytes.fromhex("66baf803" "b048" "ee" "b069" "ee" "b00a" "ee" "b0fe" "e664" "f4")
NO_LANDLOCK = textwrap.dedent("""
    import errno, os, sys, pyseccomp as sc
    f = sc.SyscallFilter(sc.ALLOW)
    for name in ("landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self"):
        f.add_rule(sc.ERRNO(errno.ENOSYS), name)
    f.load()
    os.execv(sys.argv[1], sys.argv[1:])
""")

needs_kvm = pytest.mark.skipif(kvm_unusable() is not None, reason=str(kvm_unusable()))


@pytest.fixture
def hello(tmp_path: Path) -> Path:
    k = tmp_path / "hello.elf"
    k.write_bytes(make_elf(body=HELLO, pvh=0x1000000))
    return k


def volt_run(kernel: Path, *opts: str, no_landlock: bool = False,
             config: Path | None = None) -> subprocess.CompletedProcess:
    host = ["--config", str(config)] if config else []
    cmd = [VOLT, *host, "run", "--kernel", str(kernel), "--mem", "32", *opts]
    if no_landlock:
        cmd = [sys.executable, "-c", NO_LANDLOCK, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@needs_kvm
def test_a_kernel_without_landlock_is_an_error_when_landlock_is_asked_for(hello):
    res = volt_run(hello, no_landlock=True)
    assert res.returncode == 15, res.stderr
    assert res.stderr.strip() == ("volt: error: --landlock=on: this kernel has no Landlock (it "
                                  "needs Linux 5.13+ built with CONFIG_SECURITY_LANDLOCK and "
                                  "'landlock' in the lsm= boot parameter)")
    assert res.stdout == ""                       # the guest never ran


@needs_kvm
def test_best_effort_warns_and_still_confines_with_seccomp(hello):
    res = volt_run(hello, "--landlock=best-effort", no_landlock=True)
    assert res.returncode == 0, res.stderr
    assert "volt: warning: running without Landlock" in res.stderr
    assert "landlock UNAVAILABLE" in res.stderr and "seccomp kill" in res.stderr
    assert "capabilities dropped" in res.stderr
    assert res.stdout.replace("\r", "") == "Hi\n"


@needs_kvm
def test_unconfined_only_when_asked_and_never_silently(hello):
    res = volt_run(hello, "--landlock=off", "--seccomp=off")
    assert res.returncode == 0, res.stderr
    assert "volt: warning: running UNCONFINED (--landlock=off --seccomp=off)" in res.stderr
    default = volt_run(hello)
    assert default.returncode == 0, default.stderr
    assert "volt: confined: landlock ABI" in default.stderr and "seccomp kill" in default.stderr


@needs_kvm
@pytest.mark.parametrize("landlock", ["on", "best-effort", "off"])
@pytest.mark.parametrize("mode", ["kill", "log", "off"])
def test_every_mode_runs_a_guest_to_its_end(hello, landlock, mode):
    """Each combination gets through a VM's whole life, exit path included (a first
    version killed the main thread there: Python's open() asks every file for TCGETS)."""
    res = volt_run(hello, f"--landlock={landlock}", f"--seccomp={mode}", "--timing")
    assert res.returncode == 0, res.stderr
    assert res.stdout.replace("\r", "") == "Hi\n"
    assert "volt: setup " in res.stderr


def _child(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_confinement_refuses_a_process_that_already_has_threads():
    p = _child("""
        import threading, time
        from volt.jail.confine import Confinement
        from volt.jail.policy import Policy
        threading.Thread(target=time.sleep, args=(30,), name="early", daemon=True).start()
        try:
            Confinement().apply_process(Policy())
        except Exception as exc:
            print(type(exc).__name__, exc.exit_code, exc)
    """)
    out, err = p.communicate(timeout=60)
    assert out.strip() == ("VoltError 15 cannot confine: threads already running (early); "
                           "confinement must start single-threaded"), err


def test_api_thread_serves_a_unix_socket_and_dies_on_anything_else(tmp_path):
    """The API kind: accept, read, answer; an openat from that thread kills the process."""
    sock = tmp_path / "api.sock"
    p = _child("""
        import os, socket, sys, threading
        from volt.jail.confine import Confinement
        from volt.jail.policy import Policy
        conf = Confinement()
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(sys.argv[1]); srv.listen()
        print(conf.apply_process(Policy()), flush=True)
        def api():
            conf.enter_thread("api")
            while True:
                c, _ = srv.accept()
                req = c.recv(64)
                if req == b"open":
                    os.open("/", os.O_RDONLY)        # not an API thread's business
                c.sendall(b"pong " + req)
                c.close()
        threading.Thread(target=api, name="api").start()
    """, str(sock))
    assert "seccomp kill" in p.stdout.readline()

    def ask(req: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(sock))
            c.sendall(req)
            return c.recv(64)

    assert ask(b"ping") == b"pong ping"
    assert ask(b"again") == b"pong again"
    assert ask(b"open") == b""
    assert p.wait(timeout=60) == -signal.SIGSYS
    why = seccomp.explain_kill(p.pid)
    assert why is None or ("'api'" in why and "openat" in why), why


def test_every_thread_kind_is_a_subset_of_main():
    """Filters stack: a thread is held to main AND its kind, so main must allow it all."""
    main = set(seccomp.KINDS["main"])
    for kind in ("vcpu", "io", "api"):
        assert set(seccomp.KINDS[kind]) <= main, kind
        assert seccomp.rule_count(kind) == len(seccomp.KINDS[kind]) > 20
    for forbidden in ("execve", "execveat", "ptrace", "init_module", "finit_module", "mount",
                      "fork", "vfork", "clone3", "open_by_handle_at", "bpf", "kexec_load"):
        assert all(call != forbidden for call, _ in seccomp.KINDS["main"]), forbidden
    sockets = [chk for call, chk in seccomp.KINDS["main"] if call == "socket"]
    assert sockets == [(0, seccomp.U32, socket.AF_UNIX)]          # no AF_INET, no netlink
    clones = [chk for call, chk in seccomp.KINDS["main"] if call == "clone"]
    assert clones == [(0, seccomp.CLONE_THREAD, seccomp.CLONE_THREAD)]  # threads only
    for call in ("tgkill", "prctl", "ioctl"):          # never without an argument check
        assert all(chk for c, chk in seccomp.KINDS["main"] if c == call), call


class _Declares:
    """A built device that declares the host paths it still opens (HostPathsDevice)."""

    device_id, features, queue_sizes = 2, 1 << 32, (8,)

    def __init__(self, *paths: tuple[str, bool]) -> None:
        self.paths = list(paths)

    def host_paths(self) -> list[tuple[str, bool]]:
        return self.paths

    def read_config(self, offset, size): return bytes(size)
    def write_config(self, offset, data): pass
    def activate(self, features, mem, queues, interrupt): pass
    def notify(self, queue): pass
    def reset(self): pass


def test_policy_grants_the_vm_inputs_and_what_its_devices_declare(tmp_path):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    a, b = str(tmp_path / "store-a"), str(tmp_path / "store-b")
    pol = Policy.for_vm(str(kernel), "a-registry-name", [
        _Declares((a, False)), _Declares((a, False)),
        _Declares((b, True)), _Declares((b, False)),
        object(),                                     # declares nothing: grants nothing
    ])
    assert pol.read == [str(kernel), a]             # a name is no file: nothing to grant
    assert pol.write == [b]                         # one writable device is enough
    assert all(os.path.exists(d) for d in pol.devices)
    assert ("/dev/kvm" in pol.devices) == os.path.exists("/dev/kvm")


@needs_kvm
def test_a_writable_store_the_confined_vmm_could_not_write_is_refused_up_front(hello, tmp_path):
    """Without CAP_DAC_OVERRIDE root cannot write another uid's files: say so before the
    guest runs, instead of failing its disk writes later. Read-only use still works."""
    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    for args in (["host", "init"], ["vol", "create", "v1", "1MiB"]):
        r = subprocess.run([sys.executable, "-m", "stellarium_core", "--config", str(cfg), *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    for p in [tmp_path / "store", *(tmp_path / "store").rglob("*")]:
        os.chown(p, 4321, 4321)
    dev = "virtio-stellar,volume=v1"
    res = volt_run(hello, "--device", dev, config=cfg)
    assert res.returncode == 15, res.stderr
    assert "is not writable by uid 0 without capabilities (owner uid 4321)" in res.stderr
    assert res.stdout == ""
    ro = volt_run(hello, "--device", dev + ",readonly=true", config=cfg)
    assert ro.returncode == 0, ro.stderr
    assert ro.stdout.replace("\r", "") == "Hi\n"


def test_a_confined_daemon_thread_running_at_interpreter_exit_does_not_kill_the_exit():
    """Python ends such a thread with pthread_exit, and glibc opens libgcc_s for it on
    first use; confinement loads it beforehand (this once made a lab VM that shut down
    cleanly exit by SIGSYS from its API thread)."""
    p = _child("""
        import sys, threading, time
        from volt.jail.confine import Confinement
        from volt.jail.policy import Policy
        conf = Confinement()
        print(conf.apply_process(Policy()), flush=True)
        def spin():
            conf.enter_thread("api")
            while True:
                time.sleep(0.0001)
        threading.Thread(target=spin, name="api", daemon=True).start()
        time.sleep(0.2)
        sys.exit(7)
    """)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 7 and "seccomp kill" in out, (p.returncode, err)


def test_pyseccomp_is_imported_without_forking_ldconfig():
    """Its library lookups are answered by the loader (sonames), not by ``ldconfig -p``:
    a process that may not fork at all still builds and names its filters."""
    code = textwrap.dedent("""
        import subprocess
        def refuse(*a, **k):
            raise AssertionError("forked a helper while importing pyseccomp")
        subprocess.Popen = refuse
        from volt.jail import seccomp
        sc = seccomp._pyseccomp()
        assert sc._libseccomp_path == "libseccomp.so.2", sc._libseccomp_path
        seccomp.build_all("log")
        print(seccomp.syscall_name(59))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "execve (59)"
