"""Run a built microVM until it ends: threads, signals, pause/resume, poweroff detection.

:class:`Runner` drives one :class:`~volt.vmm.vm.Machine`; :func:`launch` builds and
runs a VM with no API (``volt run`` without ``--api-sock``, and the ``volt`` runtime
plugin) through an :class:`~volt.vmm.instance.Instance`, which the API drives too.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from volt.vmm import exitcodes
from volt.vmm.config import VmConfig
from volt.vmm.exitcodes import VoltError
from volt.vmm.firecracker import Telemetry
from volt.vmm.signals import KICK_SIGNAL
from volt.vmm.vm import Machine

if TYPE_CHECKING:
    from stellarium_core.host import Host
    from volt.jail.confine import Confinement

#: How often wait() checks whether every vCPU is dead-halted (poweroff).
HALT_PROBE_SECONDS = 1.0


class Runner:
    """Starts, pauses, resumes and waits for one machine."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def start(self) -> None:
        """Start the I/O thread, then one thread per vCPU.

        Process-wide confinement must already hold (``launch`` applies it before any
        thread exists); each thread confines itself first (``machine.enter_thread``).
        """
        m = self.machine
        signal.signal(KICK_SIGNAL, lambda *_: None)
        io = threading.Thread(target=self._io_main, name="io", daemon=True)
        m.threads.append(io)
        io.start()
        for v in m.vcpus:
            m.threads.append(v.start())

    def _io_main(self) -> None:
        self.machine.enter_thread("io")
        self.machine.loop.run()

    def pause(self, timeout: float = 10.0) -> None:
        """Stop every vCPU outside KVM_RUN; returns once each one is parked."""
        m = self.machine
        m.gate.set_paused(True)
        for v in m.vcpus:
            v.kick()
        alive = sum(1 for v in m.vcpus if v.thread is not None and v.thread.is_alive())
        if not m.gate.wait_parked(alive, timeout):
            raise VoltError("pause: vCPUs did not stop in time")

    def resume(self) -> None:
        self.machine.gate.set_paused(False)

    @property
    def paused(self) -> bool:
        return self.machine.gate.paused

    def wait(self, timeout: float | None = None,
             tick: Callable[[], None] | None = None) -> int | None:
        """Wait until the VM ends (or ``timeout``); returns the exit code or None.

        Meanwhile it probes, once a second, whether every vCPU sits in HLT with
        interrupts off: that is how Linux without ACPI powers off ("System halted"),
        and nothing but an NMI could wake it, so the VM ends with exit code OK.
        ``tick`` is called at each probe (the periodic metrics flush).
        """
        m = self.machine
        deadline = None if timeout is None else time.monotonic() + timeout
        dead_probes = 0
        while not m.stopped.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            step = HALT_PROBE_SECONDS if left is None else min(left, HALT_PROBE_SECONDS)
            if m.stopped.wait(step):
                break
            if tick is not None:
                tick()
            dead_probes = dead_probes + 1 if all(v.dead for v in m.vcpus) else 0
            if dead_probes >= 2:
                m.stop(exitcodes.OK, "guest halted (powered off)")
                break
            for v in m.vcpus:
                v.dead = False
            if not self.paused:
                for v in m.vcpus:
                    v.probe = True
                    v.kick()
        for t in m.threads:
            t.join(5)
        return m.exit_code

    def run(self) -> int:
        """Run until the guest ends or a signal stops it; returns the exit code."""
        self.start()
        return self.finish()

    def finish(self, tick: Callable[[], None] | None = None,
               on_end: Callable[[], None] | None = None) -> int:
        """Wait for the started VM to end, close it; returns the exit code.

        SIGTERM/SIGINT stop the VM, SIGUSR1 pauses it, SIGUSR2 resumes it (when called
        from the main thread, which is where Python delivers signals). ``tick`` runs
        about once a second meanwhile; ``on_end`` once the VM's threads are gone and
        before its devices are closed.
        """
        m = self.machine
        handlers = {signal.SIGTERM: lambda *_: m.stop(exitcodes.TERMINATED, "SIGTERM"),
                    signal.SIGINT: lambda *_: m.stop(exitcodes.TERMINATED, "SIGINT"),
                    signal.SIGUSR1: lambda *_: self.pause(),
                    signal.SIGUSR2: lambda *_: self.resume()}
        before = {}
        if threading.current_thread() is threading.main_thread():
            before = {sig: signal.signal(sig, h) for sig, h in handlers.items()}
        try:
            code = self.wait(tick=tick)
            if on_end is not None:
                on_end()
        finally:
            m.close()
            for sig, old in before.items():        # the next VM of this process installs its own
                signal.signal(sig, old)
        if code is None:
            raise VoltError("VM ended without an exit code")
        return code


def launch(cfg: VmConfig, host: Host, *, timing: bool = False,
           confinement: Confinement | None = None, telemetry: Telemetry = Telemetry(),
           snapshot: str | None = None, incoming: str | None = None) -> int:
    """Build and run the VM ``cfg`` describes (or restore the one of ``snapshot``, or
    take the one migrated to ``incoming``); returns its exit code (``volt run`` without
    an API socket, and the ``volt`` runtime plugin).

    ``confinement`` is applied after the build and before any thread starts, so it
    holds from the guest's first instruction. The console reads stdin when output
    goes to stdout. Plugins loaded in ``host``'s registry hear
    ``stellarium_instance_started`` once the VM is built and
    ``stellarium_instance_stopped`` with its exit code, as for Voltainer.
    ``telemetry`` is a config file's logger and metrics.
    """
    from volt.vmm.instance import Instance

    instance = Instance(host, cfg, confinement=confinement, telemetry=telemetry)
    if snapshot:
        instance.load_snapshot(snapshot, resume=True)
    elif incoming:
        instance.incoming(incoming)
    else:
        instance.start()
    return instance.finish(timing=timing)
