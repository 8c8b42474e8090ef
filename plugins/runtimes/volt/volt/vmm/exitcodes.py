"""Every exit code ``volt run`` can return, in one place (shown by ``volt run --help``).

Bad input is rejected before the guest starts, each kind with its own code, so a
script can tell "fix your kernel path" from "your guest crashed".
"""

from __future__ import annotations

from stellarium_core.errors import StellarError

OK = 0                 # guest rebooted or powered off
FAILED = 1             # VMM-internal failure
USAGE = 2              # bad command line (argparse)
NO_KVM = 3             # /dev/kvm missing or unusable
KERNEL = 10            # kernel missing, unreadable or not a loadable x86-64 kernel
INITRD = 11            # initrd missing or unreadable
MEMORY = 12            # guest memory too small for kernel/initrd, or too large
CMDLINE = 13           # kernel command line too long
DEVICE = 14            # unknown device or device option
CONFINE = 15           # confinement asked for (Landlock, seccomp) but not possible here
SNAPSHOT = 16          # snapshot missing, corrupt, or made for another CPU or device set
TRIPLE_FAULT = 20      # guest triple fault (KVM_EXIT_SHUTDOWN)
GUEST_ERROR = 21       # KVM could not run the guest (internal error, failed entry)
TERMINATED = 143       # stopped by SIGTERM/SIGINT; shut down cleanly

TABLE: tuple[tuple[int, str], ...] = (
    (OK, "guest rebooted or powered off"),
    (FAILED, "VMM-internal failure"),
    (USAGE, "bad command line"),
    (NO_KVM, "/dev/kvm missing or unusable"),
    (KERNEL, "kernel missing, unreadable or not a loadable x86-64 kernel"),
    (INITRD, "initrd missing or unreadable"),
    (MEMORY, "guest memory too small (or too large) for kernel and initrd"),
    (CMDLINE, "kernel command line too long"),
    (DEVICE, "unknown device or device option"),
    (CONFINE, "confinement asked for (--landlock, --seccomp) cannot be applied"),
    (SNAPSHOT, "snapshot missing, corrupt, or made for another CPU or device set"),
    (TRIPLE_FAULT, "guest triple fault"),
    (GUEST_ERROR, "KVM could not run the guest (emulation error, failed entry)"),
    (TERMINATED, "stopped by SIGTERM/SIGINT, shut down cleanly"),
)


def epilog() -> str:
    """The exit-code and signal table ``volt run --help`` ends with."""
    codes = "\n".join(f"  {code:>3}  {text}" for code, text in TABLE)
    return ("exit codes:\n" + codes + "\n\nsignals: SIGTERM/SIGINT stop the VM cleanly; "
            "SIGUSR1 pauses the vCPUs, SIGUSR2 resumes them.")


class VoltError(StellarError):
    """A failure with its own ``volt run`` exit code."""

    def __init__(self, message: str, exit_code: int = FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code
