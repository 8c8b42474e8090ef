"""Volt's Firecracker-compatible control plane: ``volt run --api-sock``, ``--config-file``.

:mod:`~volt.api.http` parses HTTP/1.1, :mod:`~volt.api.server` serves the unix
socket, :mod:`~volt.api.routes` maps Firecracker's endpoints onto an
:class:`~volt.vmm.instance.Instance`. :func:`launch` is ``volt run`` (and
``python -m volt.vmm``) after parsing: the one place that wires the API to the VMM,
as Firecracker's binary does; the VMM itself never imports the API.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import time
from typing import TYPE_CHECKING, Any

from stellarium_core.errors import UsageError
from volt.vmm import exitcodes
from volt.vmm.exitcodes import VoltError

if TYPE_CHECKING:
    import socket

    from stellarium_core.host import Host
    from volt.jail.confine import Confinement
    from volt.vmm.config import VmConfig
    from volt.vmm.firecracker import Telemetry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config-file``, ``--api-sock`` and ``--no-api``, as Firecracker has them."""
    parser.add_argument("--config-file", metavar="PATH",
                        help="the VM as Firecracker's config-file JSON (or, for a .toml file, "
                             "the keys of the host config's [vm] table); boots at once. Flags "
                             "given as well override it")
    parser.add_argument("--api-sock", metavar="PATH",
                        help="serve Firecracker's REST API on this unix socket; without "
                             "--config-file, wait for PUT /actions InstanceStart (no kernel "
                             "needed until then)")
    parser.add_argument("--snapshot", metavar="NAME",
                        help="restore the VM of snapshot NAME (`volt snapshot list`) instead "
                             "of booting, and run it; its memory, vCPUs and devices are the "
                             "snapshot's (only --serial and the confinement flags apply)")
    parser.add_argument("--incoming", metavar="HOST:PORT",
                        help="wait at HOST:PORT for a VM that `volt migrate` (PUT "
                             "/stellar/migrate) moves here, and run it (as QEMU's -incoming); "
                             "like --snapshot, it brings its own VM settings")
    parser.add_argument("--no-api", action="store_true",
                        help="no API socket (the default without --api-sock); needs "
                             "--config-file, as in Firecracker")


def launch(args: argparse.Namespace) -> int:
    """Everything ``volt run`` does after parsing its arguments; returns the exit code.

    The API socket is bound first, so clients can connect while the rest loads. This
    process exists to run the VM, so it takes the VMM's memory limits
    (:func:`volt.vmm.footprint.limit`); an embedder calling :func:`volt.vmm.runner.launch`
    keeps its own.
    """
    if args.no_api and not args.config_file:
        raise UsageError("--no-api needs --config-file (the VM must come from somewhere)")
    if args.no_api and args.api_sock:
        raise UsageError("--no-api and --api-sock exclude each other")
    from volt.vmm import footprint

    footprint.limit()
    listener = None
    if args.api_sock:
        from volt.api.server import bind

        listener = bind(args.api_sock)
        bound = time.monotonic()
    from stellarium_core.host import Host
    from volt.jail import confine
    from volt.vmm import config, firecracker
    from volt.vmm.firecracker import Telemetry

    try:
        restored = "--snapshot" if args.snapshot else "--incoming" if args.incoming else ""
        if args.snapshot and args.incoming:
            raise UsageError("--snapshot and --incoming exclude each other")
        if restored and (args.config_file or args.image or set(vars(args)) & (
                set(config.SETTINGS) - {"serial"})):
            raise UsageError(f"{restored} brings the VM as it was: give no other VM "
                             "settings than --serial")
        host = Host.from_config(args.config)
        file_layer, telemetry = None, Telemetry()
        if args.config_file:
            base = config.layered(config.host_layer(host.config))
            file_layer, telemetry = firecracker.file_layer(args.config_file, base)
        cfg = config.from_args(args, host.config, file_layer,
                               expand=lambda ref, flags: _boots().expand(host, ref, flags))
    except BaseException:
        if listener is not None:
            listener.close()
        raise
    confinement = confine.from_args(args)
    trace = _boots().chunk_trace(host, args.trace_chunks) if args.trace_chunks \
        else contextlib.nullcontext()
    with trace:
        if listener is not None:
            return serve(cfg, host, listener, boot=bool(args.config_file), timing=args.timing,
                         confinement=confinement, telemetry=telemetry, bound=bound,
                         snapshot=args.snapshot, incoming=args.incoming)
        from volt.vmm.runner import launch as run_vm

        return run_vm(cfg, host, timing=args.timing, confinement=confinement,
                      telemetry=telemetry, snapshot=args.snapshot, incoming=args.incoming)


def _boots() -> Any:
    """:mod:`volt.boots`, imported only by a VM that uses a boot manifest or a chunk trace
    (it costs every other ``volt run`` about 20 ms of imports)."""
    from volt import boots

    return boots


def serve(cfg: VmConfig, host: Host, listener: socket.socket, *, boot: bool,
          timing: bool = False, confinement: Confinement | None = None,
          telemetry: Telemetry | None = None, bound: float | None = None,
          snapshot: str | None = None, incoming: str | None = None) -> int:
    """Serve the API on ``listener`` (:func:`~volt.api.server.bind`, at monotonic time
    ``bound``); boot ``cfg`` now (``boot``), restore ``snapshot`` now, take the VM
    migrated to ``incoming``, or wait for InstanceStart or PUT /snapshot/load, then run
    until the VM ends. Returns its exit code.

    Before the start the main thread serves the API (the VM's confinement depends on
    its configuration, so there is nothing to confine yet); InstanceStart builds and
    confines the VM in that thread while it is the only one, then the API moves to
    its own thread, which stacks the ``api`` seccomp filter before serving again.
    """
    import logging

    from volt.api.routes import FirecrackerApi
    from volt.api.server import ApiServer
    from volt.vmm.firecracker import Telemetry
    from volt.vmm.instance import NOT_STARTED, Instance

    instance = Instance(host, cfg, confinement=confinement, telemetry=telemetry or Telemetry())
    server = ApiServer(listener, FirecrackerApi(instance))
    instance.metrics.mark("api_socket_accepting", bound)
    instance.metrics.mark("api_serving")
    # Request logs go where PUT /logger says; without one, not to stderr (the console's).
    logging.getLogger("volt.api").addHandler(logging.NullHandler())

    def on_signal(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if instance.machine is None:
            raise VoltError(name, exitcodes.TERMINATED)
        instance.machine.stop(exitcodes.TERMINATED, name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        if snapshot:
            instance.load_snapshot(snapshot, resume=True)
        elif incoming:
            instance.incoming(incoming)
        elif boot:
            instance.start()
        else:
            server.serve(until=lambda: instance.state != NOT_STARTED, idle=instance.prepare)
    except BaseException:
        server.close()
        raise
    machine = instance.machine
    assert machine is not None
    server.start_thread(machine.enter_thread, machine.stopped)
    try:
        return instance.finish(timing=timing)
    finally:
        server.stop()
