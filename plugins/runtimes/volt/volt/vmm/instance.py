"""One VMM process's microVM, from configuration to its end: what ``volt run`` and the API drive.

The states are Firecracker's (``InstanceInfo.state``): "Not started" while the
configuration may change, then "Running" or "Paused". :meth:`Instance.start` builds
the VM from :attr:`Instance.config`, confines the process while it is still
single-threaded, and starts the I/O and vCPU threads; :meth:`Instance.finish` waits
for the end, writes the last metrics line and reports. Whatever touches device state
from another thread (device metrics, the balloon, the keyboard) runs in the I/O
thread, the devices' own, through :meth:`Instance.in_io`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from stellarium_core.errors import StellarError
from volt.vmm import exitcodes, logger
from volt.vmm import timing as setup_timing
from volt.vmm.config import VmConfig
from volt.vmm.exitcodes import VoltError
from volt.vmm.firecracker import Telemetry
from volt.vmm.metrics import Metrics
from volt.vmm.timing import process_start

if TYPE_CHECKING:
    from stellarium_core.host import Host
    from volt.jail.confine import Confinement
    from volt.snapshot.catalog import Snapshot
    from volt.vmm.runner import Runner
    from volt.vmm.vm import Machine

log = logging.getLogger(__name__)
T = TypeVar("T")

NOT_STARTED, RUNNING, PAUSED = "Not started", "Running", "Paused"
#: End reasons that are a normal guest shutdown (nothing to report).
CLEAN_ENDS = ("guest reset", "guest powered off")
#: How long a snapshot may keep the I/O thread (reading and storing all of RAM).
SNAPSHOT_S = 600.0
#: How long one step of a live migration may wait for the other side.
MIGRATION_TIMEOUT_S = 30.0
AFTER_START = "The requested operation is not supported after starting the microVM."
BEFORE_START = "The requested operation is not supported before starting the microVM."


class Instance:
    """The microVM of this process and everything said about it before and while it runs."""

    def __init__(self, host: Host, config: VmConfig, *, confinement: Confinement | None = None,
                 telemetry: Telemetry = Telemetry()) -> None:
        self.host = host
        #: What the process was started with (flags over a config file over [vm]).
        self.base = self.config = config
        self.confinement = confinement
        self.id = f"volt-{os.getpid()}"
        self.metrics = Metrics()
        self.logger: dict[str, Any] | None = None
        self.machine: Machine | None = None
        self.runner: Runner | None = None
        #: This VM's last snapshot, or the one it was restored from: a Diff's parent.
        self.snapshot: Snapshot | None = None
        if telemetry.logger is not None:
            self.set_logger(telemetry.logger)
        if telemetry.metrics is not None:
            self.set_metrics(telemetry.metrics)

    # -- before the start ---------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.runner is None:
            return NOT_STARTED
        return PAUSED if self.runner.paused else RUNNING

    @property
    def telemetry(self) -> Telemetry:
        return Telemetry(self.logger, {"metrics_path": self.metrics.path}
                         if self.metrics.configured else None)

    def prepare(self) -> None:
        """What a pre-started VMM does while nothing is asked of it: import what its VM
        will need (:mod:`volt.vmm.preload`) and open the host's store, so a start or a
        PUT /snapshot/load spends nothing on either. What fails here (a missing
        libseccomp, a damaged store) is left for the request that needs it to report."""
        from volt.vmm import preload

        with contextlib.suppress(ImportError, OSError):
            preload.modules()
        if (self.host.store_path / "nebula").is_dir():
            with contextlib.suppress(StellarError):
                _ = self.host.store     # opened now; the Host keeps it

    def _preboot(self) -> None:
        if self.runner is not None:
            raise VoltError(AFTER_START)

    def configure(self, cfg: VmConfig) -> None:
        self._preboot()
        self.config = cfg

    def set_logger(self, settings: Mapping[str, Any]) -> None:
        """A checked Firecracker Logger object; the output is opened now."""
        self._preboot()
        logger.configure(settings, self.id)
        self.logger = {k: v for k, v in settings.items() if v is not None}

    def set_metrics(self, settings: Mapping[str, Any]) -> None:
        self._preboot()
        self.metrics.configure(settings["metrics_path"])

    # -- the start ------------------------------------------------------------------------

    def start(self) -> None:
        """Build the VM, confine the process, start its threads (Firecracker's InstanceStart).

        A failure leaves the instance "Not started" with nothing built, so the
        configuration can be fixed and the start tried again.
        """
        self._preboot()
        from volt.vmm.builder import build

        self._launch(lambda console: build(self.config, self.host, console=console))

    def load_snapshot(self, name: str, *, resume: bool = False) -> None:
        """Build the VM from snapshot ``name`` instead (Firecracker's PUT /snapshot/load):
        its RAM mapped copy-on-write from the store, every state restored, its volumes
        cloned. It stays paused unless ``resume``."""
        self._preboot()
        from volt.snapshot import catalog

        try:
            snap = catalog.load(self.host, name)
        except StellarError as exc:
            raise VoltError(str(exc), exitcodes.SNAPSHOT) from None
        self._restore(snap, resume=resume)

    def _restore(self, snap: Snapshot, *, resume: bool,
                 handover: Callable[[], None] | None = None) -> None:
        from volt.snapshot.machine import drop_volumes, restored_config
        from volt.vmm.builder import build_restored

        cfg = replace(restored_config(self.host, snap, self.id), serial=self.config.serial)
        old, self.config = self.config, cfg
        try:
            self._launch(lambda console: build_restored(snap, cfg, self.host, console=console),
                         paused=not resume, handover=handover)
        except BaseException:
            self.config = old
            drop_volumes(self.host, [str(d.params["volume"]) for d in cfg.devices
                                     if d.id in snap.manifest.volumes])
            raise
        self.snapshot = snap

    def incoming(self, address: str, timeout: float = MIGRATION_TIMEOUT_S) -> None:
        """Become the VM a source migrates here (``volt run --incoming HOST:PORT``): take
        its chunks and state, restore it, and run it once the source lets go. On failure
        nothing is kept (no snapshot record, no VM)."""
        self._preboot()
        from volt.snapshot import catalog, migrate, wire

        try:
            conn = migrate.listen(address, timeout)
        except StellarError as exc:
            raise VoltError(str(exc), exitcodes.SNAPSHOT) from None
        name = f"migrated.{self.id}"
        try:
            snap, w = migrate.receive(self.host, conn, name)

            def handover() -> None:   # built and paused, not yet confined: GO runs it
                w.send(wire.READY)
                w.recv(wire.GO)

            try:
                self._restore(snap, resume=True, handover=handover)
            except BaseException as exc:
                w.fail(str(exc))
                catalog.remove(self.host, name)
                raise
            # confined now: a plain write (no sendto); the source ends its VM on it
            os.write(conn.fileno(), wire.HEAD.pack(wire.RUNNING, 0))
        except StellarError as exc:
            raise VoltError(f"incoming migration at {address}: {exc}",
                            exitcodes.SNAPSHOT) from None
        finally:
            conn.close()

    def migrate(self, to: str, timeout: float = MIGRATION_TIMEOUT_S) -> dict[str, Any]:
        """Move the running VM to the Volt process waiting at ``to`` (``volt run
        --incoming``), sending only the chunks it lacks; this VM ends when the target
        runs it. What was sent, against the VM's memory size."""
        machine, runner = self._running()
        self._unconfined("migrates")
        from volt.snapshot import migrate

        try:
            sock = migrate.connect(to, timeout)
        except StellarError as exc:
            raise VoltError(str(exc)) from None
        was_paused = runner.paused
        try:
            src = migrate.Source(machine, self.config, self.host, sock)
            src.precopy()
            runner.pause()
            try:
                machine.loop.call(src.finish, timeout=SNAPSHOT_S)
            except BaseException:
                if not was_paused:
                    runner.resume()
                raise
        except (StellarError, TimeoutError, RuntimeError) as exc:
            sock.close()
            raise VoltError(f"migration to {to} failed: {exc}; the VM "
                            f"{'stays paused' if was_paused else 'runs on'} here") from None
        try:
            src.hand_over()
        except StellarError as exc:
            raise VoltError(f"migration to {to}: {exc} after the handover; the target may "
                            "run the VM, so it stays paused here (resume it if the target "
                            "does not)") from None
        finally:
            sock.close()
        machine.stop(exitcodes.OK, f"migrated to {to}")
        return src.outcome.summary()

    def create_snapshot(self, name: str, kind: str = "Full") -> Snapshot:
        """Snapshot the paused VM as ``name`` in the store (PUT /snapshot/create). A Diff
        builds on this VM's last snapshot (or the one it was restored from)."""
        machine, runner = self._running()
        if not runner.paused:
            raise VoltError("a snapshot needs a paused VM (PATCH /vm {\"state\": \"Paused\"} "
                            "first)")
        self._unconfined("snapshots")
        from volt.snapshot.machine import capture

        cfg, parent = self.config, self.snapshot
        try:
            snap = self.in_io(lambda: capture(machine, self.host, name, cfg, kind=kind,
                                              parent=parent), timeout=SNAPSHOT_S)
        except StellarError as exc:
            raise VoltError(f"snapshot {name!r}: {exc}") from None
        self.snapshot = snap
        return snap

    def _unconfined(self, what: str) -> None:
        """Refuse (losing nothing) what a confined VMM cannot do: reach the store or the
        network (Landlock), or make the syscalls for it (seccomp would end the VM)."""
        c = self.confinement
        if c is not None and (c.landlock, c.seccomp) != ("off", "off"):
            raise VoltError(f"the VMM itself {what}, which it cannot do once confined: run "
                            "this VM with --landlock off --seccomp off for it (a restore, "
                            "and the target of a migration, may be confined)")

    def _launch(self, build: Callable[[Callable[[bytes], None]], Machine],
                paused: bool = False, handover: Callable[[], None] | None = None) -> None:
        """The start's common part: build (with the console sink), confine, run.
        ``handover`` runs between the build and the confinement."""
        from volt.vmm import footprint
        from volt.vmm.devices.console import feed_console, open_sink
        from volt.vmm.runner import Runner

        self.metrics.mark("start_requested")
        cfg = self.config
        sink = open_sink(cfg.serial)
        phases = self.metrics.phases

        def console(data: bytes) -> None:
            if "first_console_output" not in phases:
                self.metrics.mark("first_console_output")
            sink(data)

        setup_timing.mark("imports")
        machine = build(console)
        footprint.trim()
        self.metrics.mark("built")
        try:
            if handover is not None:
                handover()
            if self.confinement is not None:
                from volt.jail.confine import apply

                apply(self.confinement, cfg, machine)
                self.metrics.mark("confined")
                setup_timing.mark("confinement")
            if cfg.serial == "stdout" and machine.serial is not None:
                try:
                    feed_console(sys.stdin.fileno(), machine.serial, machine.stopped,
                                 machine.enter_thread)
                except (AttributeError, OSError, ValueError):
                    pass          # no usable stdin (embedded, redirected away): output only
        except BaseException:
            machine.close()
            raise
        self.machine = machine
        self.host.registry.hook.stellarium_instance_started(
            runtime="volt", instance=self.id, info={
                "pid": os.getpid(), "kernel": cfg.kernel, "vcpus": cfg.vcpus,
                "memory_mib": cfg.memory_mib, "devices": [d.id for d in cfg.devices]})
        self.runner = Runner(machine)
        machine.gate.set_paused(paused)
        self.runner.start()
        log.info("microVM %s started: %s", self.id, cfg.kernel)

    # -- while it runs --------------------------------------------------------------------

    def _running(self) -> tuple[Machine, Runner]:
        if self.machine is None or self.runner is None:
            raise VoltError(BEFORE_START)
        if self.machine.stopped.is_set():
            raise VoltError(f"the microVM has ended ({self.machine.exit_reason})")
        return self.machine, self.runner

    def pause(self) -> None:
        self._running()[1].pause()

    def resume(self) -> None:
        self._running()[1].resume()

    def in_io(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """``fn()`` run in the I/O thread (device state lives there)."""
        machine = self._running()[0]
        try:
            return machine.loop.call(fn, timeout)
        except (TimeoutError, RuntimeError) as exc:
            raise VoltError(f"the VM's I/O thread: {exc}") from None

    def ctrl_alt_del(self) -> None:
        from volt.vmm.devices.i8042 import KeyboardNotReady

        machine = self._running()[0]
        keyboard = machine.i8042
        if keyboard is None:
            raise VoltError("this VM has no i8042 keyboard")
        try:
            self.in_io(keyboard.ctrl_alt_del)     # the IRQ may need KVM_IRQ_LINE: I/O thread
        except KeyboardNotReady as exc:
            raise VoltError(f"SendCtrlAltDel: {exc}") from None

    def device(self, ident: str) -> Any:
        """The running device object with DeviceSpec id ``ident``."""
        t = self._running()[0].devices.transports.get(ident)
        if t is None:
            raise VoltError(f"the running VM has no device {ident!r}")
        return t.device

    # -- metrics --------------------------------------------------------------------------

    def flush_metrics(self) -> None:
        if not self.metrics.configured:
            raise VoltError("the metrics system was not initialized (PUT /metrics first)")
        if not self.metrics.write(self.metrics_line()):
            raise VoltError(f"metrics line could not be written to {self.metrics.path}")

    def metrics_line(self) -> dict[str, Any]:
        """Everything measured so far, as one Firecracker-style metrics object."""
        start = process_start()
        line: dict[str, Any] = {
            "utc_timestamp_ms": int(time.time() * 1000), "instance": self.id,
            "state": self.state,
            "boot": {f"{k}_ms": round((v - start) * 1000, 3)
                     for k, v in sorted(self.metrics.phases.items(), key=lambda kv: kv[1])},
            **{k: dict(v) for k, v in self.metrics.api.items()}}
        m = self.machine
        if m is None:
            return line
        if m.first_run is not None:
            line["boot"]["first_kvm_run_ms"] = round((m.first_run - start) * 1000, 3)
        exits: Counter[str] = Counter()
        for v in m.vcpus:
            exits.update(dict(v.exits))        # one C-level copy: vCPUs keep counting
        line["vcpu"] = {f"exits_{k}": n for k, n in sorted(exits.items())}
        if m.dropped_stores:
            line["read_only_memory"] = {name: {"dropped_stores": d.count}
                                        for name, d in m.dropped_stores.items()}
        if m.i8042 is not None:
            line["i8042"] = {"resets": m.i8042.resets, "ctrl_alt_del": m.i8042.keys_sent}
        devices = self.in_io(self._device_metrics) if not m.stopped.is_set() \
            else self._device_metrics()
        line["devices"] = devices
        chunks = [d for d in devices.values() if "shared_chunks" in d]
        if chunks:
            line["volumes"] = {k: sum(d[k] for d in chunks) for k in ("chunks", "shared_chunks")}
        return line

    def _device_metrics(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        assert self.machine is not None
        for ident, t in self.machine.devices.transports.items():
            fn = getattr(t.device, "metrics", None)
            if fn is None:
                continue
            try:
                out[ident] = dict(fn())
            except Exception as exc:     # one device's broken metrics must not hide others
                out[ident] = {"error": f"{type(exc).__name__}: {exc}"}
        return out

    def _tick(self) -> None:
        if self.metrics.due():
            try:
                self.flush_metrics()
            except VoltError as exc:
                log.warning("periodic metrics flush: %s", exc)

    # -- the end --------------------------------------------------------------------------

    def finish(self, *, timing: bool = False) -> int:
        """Wait for the started VM to end; returns its exit code (and says why on stderr
        unless the guest shut down normally)."""
        machine, runner = self._running_or_ended()
        code = exitcodes.FAILED
        try:
            code = runner.finish(tick=self._tick, on_end=self._last_line)
        finally:
            self.host.registry.hook.stellarium_instance_stopped(
                runtime="volt", instance=self.id, exit_code=code)
        if timing and machine.first_run is not None:
            split = ", ".join(f"{name} {ms:.1f}"
                              for name, ms in setup_timing.phases(machine.first_run))
            print(f"volt: setup {1000 * (machine.first_run - process_start()):.1f} ms "
                  f"(process start to first KVM_RUN): {split}", file=sys.stderr)
            exits = sum((v.exits for v in machine.vcpus), Counter())
            print("volt: exits " + " ".join(f"{k}={n}" for k, n in sorted(exits.items())),
                  file=sys.stderr)
        if code != exitcodes.OK or machine.exit_reason not in CLEAN_ENDS:
            print(f"volt: {machine.exit_reason}", file=sys.stderr)
        return code

    def _running_or_ended(self) -> tuple[Machine, Runner]:
        if self.machine is None or self.runner is None:
            raise VoltError(BEFORE_START)
        return self.machine, self.runner

    def _last_line(self) -> None:
        if self.metrics.configured:
            self.metrics.write(self.metrics_line())
