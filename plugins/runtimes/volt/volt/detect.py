"""Is this machine's /dev/kvm hardware-assisted, or a slow emulator that cannot boot Linux?

Some hosts expose a /dev/kvm whose every ioctl works but which interprets guest
code about 1000x slower than hardware and stops on instructions Linux needs.
Booting there never finishes, so before a boot Volt times a tiny real-mode
guest: it writes 0x42 to port 0x10 (a warm-up exit that also proves the run
loop works), then spins a fixed ``dec ecx / jnz`` loop and halts. Only the
loop's KVM_RUN is timed. Hardware (and the nested lab) take a few ns per
iteration; the emulator takes hundreds.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import signal
import struct
import sys
import time
from dataclasses import asdict, dataclass

from stellarium_core.errors import StellarError

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_RUN = 0xAE80
KVM_GET_REGS, KVM_SET_REGS = 0x8090AE81, 0x4090AE82
KVM_GET_SREGS, KVM_SET_SREGS = 0x8138AE83, 0x4138AE84
KVM_EXIT_IO, KVM_EXIT_HLT = 2, 5
EXIT_NAMES = {0: "UNKNOWN", 2: "IO", 5: "HLT", 6: "MMIO", 8: "SHUTDOWN", 9: "FAIL_ENTRY",
              17: "INTERNAL_ERROR"}

#: Loop iterations: about 0.1 s on the emulator, well under 1 ms on hardware.
ITERATIONS = 100_000
#: Above this many ns per loop iteration the /dev/kvm is software, not hardware.
THRESHOLD_NS = 250.0
#: A calibration that takes longer than this is abandoned (and means "not assisted").
WATCHDOG_S = 5.0
LAB_HINT = ("This /dev/kvm cannot boot Linux here. Run boots in the nested KVM lab: "
            "`volt lab run -- CMD` (or the `lab` pytest fixture).")


@dataclass(frozen=True)
class Detection:
    """The verdict plus the measurement behind it."""

    kvm_present: bool
    assisted: bool
    api_version: int | None
    iterations: int
    loop_seconds: float | None
    ns_per_iteration: float | None
    threshold_ns: float
    reason: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class _Watchdog(Exception):
    pass


def _guest_code(iterations: int) -> bytes:
    return (b"\xb0\x42"  # mov al, 0x42
            b"\xe6\x10"  # out 0x10, al
            b"\x66\xb9" + struct.pack("<I", iterations)  # mov ecx, N
            + b"\x66\x49"  # loop: dec ecx
            b"\x75\xfc"  # jnz loop
            b"\xf4")  # hlt


def _calibrate(path: str, iterations: int) -> tuple[int, float]:
    """Run the probe guest; return (api version, seconds of the timed loop)."""
    kvm = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    fds = [kvm]
    try:
        api = fcntl.ioctl(kvm, KVM_GET_API_VERSION)
        if api != 12:
            raise StellarError(f"{path}: unexpected KVM API version {api}")
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        fds.append(vm)
        mem = mmap.mmap(-1, 0x10000)
        code = _guest_code(iterations)
        mem[0x1000:0x1000 + len(code)] = code
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION,
                    struct.pack("<IIQQQ", 0, 0, 0, len(mem), addr))
        vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
        fds.append(vcpu)
        run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE)
        run = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        sregs = bytearray(312)
        fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
        struct.pack_into("<Q", sregs, 0, 0)  # cs.base
        struct.pack_into("<H", sregs, 12, 0)  # cs.selector
        fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
        regs = bytearray(144)
        fcntl.ioctl(vcpu, KVM_GET_REGS, regs)
        struct.pack_into("<QQ", regs, 128, 0x1000, 0x2)  # rip, rflags
        fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))

        def step(want: int) -> None:
            fcntl.ioctl(vcpu, KVM_RUN, 0)
            reason = struct.unpack_from("<I", run, 8)[0]
            if reason != want:
                raise StellarError(f"probe guest exited with {EXIT_NAMES.get(reason, reason)}, "
                                   f"expected {EXIT_NAMES[want]}")

        step(KVM_EXIT_IO)
        _dir, size, port, count, off = struct.unpack_from("<BBHIQ", run, 32)
        if (port, size, run[off]) != (0x10, 1, 0x42):
            raise StellarError(f"probe guest wrote {run[off]:#x} to port {port:#x}, "
                               "expected 0x42 to 0x10")
        started = time.perf_counter()
        step(KVM_EXIT_HLT)
        return api, time.perf_counter() - started
    finally:
        for fd in reversed(fds):
            os.close(fd)


def detect(path: str = "/dev/kvm", iterations: int = ITERATIONS) -> Detection:
    """Measure ``path``; never hangs (a watchdog abandons a calibration after 5 s)."""
    def verdict(present: bool, assisted: bool, reason: str, api: int | None = None,
                secs: float | None = None) -> Detection:
        ns = secs * 1e9 / iterations if secs is not None else None
        return Detection(present, assisted, api, iterations, secs, ns, THRESHOLD_NS, reason)

    if not os.path.exists(path):
        return verdict(False, False, f"{path} does not exist (no KVM on this machine)")
    old = signal.getsignal(signal.SIGALRM)
    in_main = _in_main_thread()
    if in_main:
        def _alarm(*_: object) -> None:
            raise _Watchdog

        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, WATCHDOG_S)
    try:
        api, secs = _calibrate(path, iterations)
    except _Watchdog:
        return verdict(True, False, f"the calibration guest did not finish within "
                       f"{WATCHDOG_S:g}s: {path} is far slower than hardware")
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return verdict(True, False, f"no permission to use {path}: {exc.strerror}")
        return verdict(True, False, f"{path} failed the probe: {exc}")
    except StellarError as exc:
        return verdict(True, False, f"{path} failed the probe: {exc}")
    finally:
        if in_main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    ns = secs * 1e9 / iterations
    if ns > THRESHOLD_NS:
        return verdict(True, False, f"{path} runs guest code at {ns:.0f} ns per loop "
                       f"iteration (hardware: a few ns); it is a software emulator", api, secs)
    return verdict(True, True, f"{path} is hardware-assisted ({ns:.1f} ns per loop iteration)",
                   api, secs)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


_cached: Detection | None = None


def require_assisted_kvm(path: str = "/dev/kvm") -> Detection:
    """Call before booting Linux: raise a plain StellarError pointing to the lab if KVM is slow.

    The result for the default path is measured once per process.
    """
    global _cached
    det = _cached if (_cached is not None and path == "/dev/kvm") else detect(path)
    if path == "/dev/kvm":
        _cached = det
    if not det.assisted:
        raise StellarError(f"{det.reason}. {LAB_HINT}")
    return det


def main() -> int:
    """``python -m volt.detect [--json]``: the same report as ``volt detect``."""
    det = detect()
    if "--json" in sys.argv[1:]:
        print(json.dumps(det.to_dict(), indent=2, sort_keys=True))
    else:
        print(det.reason + ("" if det.assisted else f"\n{LAB_HINT}"))
    return 0 if det.assisted else 1


if __name__ == "__main__":
    sys.exit(main())
