"""Firecracker's REST API on an :class:`~volt.vmm.instance.Instance` (plus Volt's /stellar/...).

The endpoints, statuses and ``{"fault_message": ...}`` bodies follow Firecracker's
swagger of :data:`~volt.vmm.firecracker.FIRECRACKER_API`: 204 for a change, 200 with
JSON for a read, 400 with a fault message for everything that cannot be done. A body
is checked by :mod:`volt.vmm.firecracker`, so an API request and a config file are
validated alike; before the start, a request changes the instance's VmConfig, after
it, the running VM. A device whose plugin is not installed is refused when it is
configured, naming the plugin. Volt's own extensions live under ``/stellar/``:
``PUT /stellar/devices/{id}`` takes any device plugin (``{"plugin", "params"}``) and
``GET /stellar/metrics`` answers the current metrics object, and ``PUT /stellar/migrate``
(``{"to": "HOST:PORT"}``) moves the running VM to a ``volt run --incoming`` process.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import cache
from typing import Any

from stellarium_core.errors import StellarError
from volt import __version__
from volt.api.http import Request, Response, fault
from volt.vmm import firecracker as fc
from volt.vmm.config import DeviceSpec, VmConfig
from volt.vmm.instance import AFTER_START, BEFORE_START, NOT_STARTED, Instance

log = logging.getLogger(__name__)

ANY = "{id}"
Body = Any
RouteFn = Callable[[Body, list[str]], Response | None]


class Fault(Exception):
    """A request the API answers with 400 and this message."""


@cache
def _installed_devices() -> tuple[str, ...]:
    """Device plugin names, read on the first device request: always before the start,
    so before confinement (after it, every device request is refused anyway)."""
    from stellarium_core.plugins import installed

    return tuple(sorted({p.name for p in installed("device")}))


class FirecrackerApi:
    """The request handler: ``api(request) -> response``, for :class:`ApiServer`."""

    def __init__(self, instance: Instance) -> None:
        self.vm = instance
        self.routes: dict[tuple[str, tuple[str, ...]], RouteFn] = {
            ("GET", ()): self.get_instance_info,
            ("GET", ("version",)): self.get_version,
            ("GET", ("machine-config",)): self.get_machine_config,
            ("PUT", ("machine-config",)): self.put_machine_config,
            ("PATCH", ("machine-config",)): self.patch_machine_config,
            ("PUT", ("boot-source",)): self.put_boot_source,
            ("PUT", ("drives", ANY)): self.put_drive,
            ("PATCH", ("drives", ANY)): self.patch_drive,
            ("PUT", ("network-interfaces", ANY)): self.put_network_interface,
            ("PATCH", ("network-interfaces", ANY)): self.patch_network_interface,
            ("PUT", ("vsock",)): self.put_vsock,
            ("PUT", ("entropy",)): self.put_entropy,
            ("GET", ("balloon",)): self.get_balloon,
            ("PUT", ("balloon",)): self.put_balloon,
            ("PATCH", ("balloon",)): self.patch_balloon,
            ("GET", ("balloon", "statistics")): self.get_balloon_statistics,
            ("PATCH", ("balloon", "statistics")): self.patch_balloon_statistics,
            ("PUT", ("logger",)): self.put_logger,
            ("PUT", ("metrics",)): self.put_metrics,
            ("PUT", ("actions",)): self.put_actions,
            ("PATCH", ("vm",)): self.patch_vm,
            ("PUT", ("snapshot", "create")): self.put_snapshot_create,
            ("PUT", ("snapshot", "load")): self.put_snapshot_load,
            ("GET", ("vm", "config")): self.get_vm_config,
            ("PUT", ("stellar", "devices", ANY)): self.put_stellar_device,
            ("PUT", ("stellar", "migrate")): self.put_stellar_migrate,
            ("GET", ("stellar", "metrics")): self.get_stellar_metrics,
        }

    def __call__(self, req: Request) -> Response:
        try:
            resp = self._dispatch(req) or Response(204)
        except Fault as exc:
            resp = fault(str(exc))
        except (StellarError, OSError) as exc:      # ConfigError, VoltError, device errors
            resp = fault(str(exc))
        self.vm.metrics.count_api(req.method, req.path, resp.status < 400)
        if resp.status < 400:
            log.info("API %s %s: %d", req.method, req.path, resp.status)
        else:
            log.warning("API %s %s: %d %s", req.method, req.path, resp.status,
                        resp.body.get("fault_message") if isinstance(resp.body, dict) else "")
        return resp

    def _dispatch(self, req: Request) -> Response | None:
        tokens = tuple(t for t in req.path.split("/") if t)
        for (method, pattern), fn in self.routes.items():
            if method == req.method and len(pattern) == len(tokens) and all(
                    p in (t, ANY) for p, t in zip(pattern, tokens, strict=True)):
                ids = [t for p, t in zip(pattern, tokens, strict=True) if p == ANY]
                return fn(self._body(req), ids)
        raise Fault(f"Invalid request method and/or path: {req.method} {req.path}.")

    @staticmethod
    def _body(req: Request) -> Body:
        if req.method == "GET":
            if req.body:
                raise Fault("GET request cannot have a body.")
            return None
        if not req.body.strip():
            raise Fault(f"Empty {req.method} request.")
        try:
            return json.loads(req.body.decode("utf-8"))
        except (ValueError, RecursionError) as exc:   # JSONDecodeError, bad UTF-8, nesting
            raise Fault("An error occurred when deserializing the json body of a request: "
                        f"{exc if not isinstance(exc, RecursionError) else 'nested too deeply'}"
                        ".") from None

    # -- helpers ---------------------------------------------------------------------------

    def _preboot(self) -> VmConfig:
        if self.vm.state != NOT_STARTED:
            raise Fault(AFTER_START)
        return self.vm.config

    def _running(self) -> None:
        if self.vm.state == NOT_STARTED:
            raise Fault(BEFORE_START)

    @staticmethod
    def _same_id(ids: list[str], body_id: str) -> None:
        reason = fc.api_id_problem(ids[0])
        if reason:
            raise Fault(reason)
        if body_id != ids[0]:
            raise Fault("The id from the path does not match the id from the body!")

    @staticmethod
    def _buildable(spec: DeviceSpec, what: str) -> None:
        have = _installed_devices()
        if spec.plugin not in have:
            raise Fault(f"{what}: Volt cannot build this device here: no device plugin named "
                        f"{spec.plugin!r} is installed (installed: {', '.join(have) or 'none'})")

    def _put(self, spec: DeviceSpec, plugins: tuple[str, ...], what: str, *,
             single: bool = False, **settings: Any) -> None:
        """Configure ``spec`` before the start; ``single`` devices (vsock, entropy, balloon)
        replace any earlier one whatever its id."""
        cfg = self._preboot()
        self._buildable(spec, what)
        if single:
            cfg = fc.with_settings(cfg, {"devices": tuple(
                d for d in cfg.devices if d.plugin != spec.plugin or d.id == spec.id)})
        self.vm.configure(fc.put_device(cfg, spec, plugins, what, **settings))

    def _balloon(self) -> DeviceSpec:
        spec = next((d for d in self.vm.config.devices if d.plugin == fc.BALLOON), None)
        if spec is None:
            raise Fault("No balloon device configured.")
        return spec

    def _device_call(self, spec: DeviceSpec, method: str, *args: Any) -> Any:
        """Call ``method`` on the running device of ``spec`` in the I/O thread."""
        dev = self.vm.device(spec.id)
        fn = getattr(dev, method, None)
        if fn is None:
            raise Fault(f"{spec.id}: the {spec.plugin} device does not offer {method}()")
        return self.vm.in_io(lambda: fn(*args))

    def _set_balloon_param(self, key: str, value: Any) -> None:
        spec = self._balloon()
        new = DeviceSpec(spec.plugin, {**spec.params, key: value}, spec.id)
        self.vm.configure(fc.put_device(self.vm.config, new, (fc.BALLOON,), "balloon"))

    # -- the endpoints -----------------------------------------------------------------------

    def get_instance_info(self, body: Body, ids: list[str]) -> Response:
        return Response(200, {"id": self.vm.id, "state": self.vm.state,
                              "vmm_version": __version__, "app_name": "Volt"})

    def get_version(self, body: Body, ids: list[str]) -> Response:
        return Response(200, {"firecracker_version": fc.FIRECRACKER_API})

    def get_machine_config(self, body: Body, ids: list[str]) -> Response:
        return Response(200, fc.render_machine_config(self.vm.config))

    def put_machine_config(self, body: Body, ids: list[str], partial: bool = False) -> None:
        cfg = self._preboot()
        self.vm.configure(fc.with_settings(cfg, fc.machine_config(body, partial=partial)))

    def patch_machine_config(self, body: Body, ids: list[str]) -> None:
        self.put_machine_config(body, ids, partial=True)

    def put_boot_source(self, body: Body, ids: list[str]) -> None:
        cfg = self._preboot()
        self.vm.configure(fc.with_settings(cfg, fc.boot_source(body, self.vm.base)))

    def put_drive(self, body: Body, ids: list[str]) -> None:
        cfg = self._preboot()
        d = fc.drive(body)
        self._same_id(ids, d.spec.id)
        self._buildable(d.spec, f"drive {d.spec.id}")
        self.vm.configure(fc.put_drive(cfg, d))

    def patch_drive(self, body: Body, ids: list[str]) -> None:
        self._running()
        p = fc.checked(body, fc.PARTIAL_DRIVE)
        self._same_id(ids, p["drive_id"])
        spec = next((d for d in self.vm.config.devices if d.id == ids[0]
                     and d.plugin in fc.DRIVE_PLUGINS), None)
        if spec is None:
            raise Fault(f"no drive {ids[0]!r}")
        if p["path_on_host"] is not None:
            self._device_call(spec, "set_backing", p["path_on_host"])

    def put_network_interface(self, body: Body, ids: list[str]) -> None:
        spec = fc.network_interface(body)
        self._same_id(ids, spec.id)
        self._put(spec, (fc.NET,), f"network interface {spec.id}")

    def patch_network_interface(self, body: Body, ids: list[str]) -> None:
        self._running()
        p = fc.checked(body, fc.PARTIAL_NETWORK_INTERFACE)
        self._same_id(ids, p["iface_id"])
        if not any(d.id == ids[0] and d.plugin == fc.NET for d in self.vm.config.devices):
            raise Fault(f"no network interface {ids[0]!r}")

    def put_vsock(self, body: Body, ids: list[str]) -> None:
        self._put(fc.vsock(body), (fc.VSOCK,), "vsock", single=True)

    def put_entropy(self, body: Body, ids: list[str]) -> None:
        self._put(fc.entropy(body), (fc.RNG,), "entropy", single=True)

    def get_balloon(self, body: Body, ids: list[str]) -> Response:
        self._balloon()
        return Response(200, fc.render(self.vm.config, self.vm.telemetry)["balloon"])

    def put_balloon(self, body: Body, ids: list[str]) -> None:
        self._put(fc.balloon(body), (fc.BALLOON,), "balloon", single=True)

    def patch_balloon(self, body: Body, ids: list[str]) -> None:
        amount = fc.checked(body, fc.BALLOON_UPDATE)["amount_mib"]
        spec = self._balloon()
        if self.vm.state == NOT_STARTED:
            self._set_balloon_param("amount_mib", amount)
        else:
            self._device_call(spec, "set_target_mib", amount)

    def get_balloon_statistics(self, body: Body, ids: list[str]) -> Response:
        self._running()
        spec = self._balloon()
        if not int(spec.params.get("stats_polling_interval_s", 0)):
            raise Fault("Statistics for the balloon device are not enabled")
        return Response(200, self._device_call(spec, "statistics"))

    def patch_balloon_statistics(self, body: Body, ids: list[str]) -> None:
        seconds = fc.checked(body, fc.BALLOON_STATS_UPDATE)["stats_polling_interval_s"]
        spec = self._balloon()
        if self.vm.state == NOT_STARTED:
            self._set_balloon_param("stats_polling_interval_s", seconds)
            return
        if bool(seconds) != bool(int(spec.params.get("stats_polling_interval_s", 0))):
            raise Fault("Cannot enable/disable the statistics after boot.")
        self._device_call(spec, "set_stats_interval", seconds)

    def put_logger(self, body: Body, ids: list[str]) -> None:
        self._preboot()
        self.vm.set_logger(fc.logger(body))

    def put_metrics(self, body: Body, ids: list[str]) -> None:
        self._preboot()
        self.vm.set_metrics(fc.metrics(body))

    def put_actions(self, body: Body, ids: list[str]) -> None:
        action = fc.checked(body, fc.ACTION)["action_type"]
        if action == "InstanceStart":
            if self._preboot().kernel == "":
                raise Fault("Cannot start microvm without kernel configuration.")
            self.vm.start()
        elif action == "SendCtrlAltDel":
            self._running()
            self.vm.ctrl_alt_del()
        else:
            self.vm.flush_metrics()

    def patch_vm(self, body: Body, ids: list[str]) -> None:
        state = fc.checked(body, fc.VM_STATE)["state"]
        self._running()
        if state == "Paused":
            self.vm.pause()
        else:
            self.vm.resume()

    def put_snapshot_create(self, body: Body, ids: list[str]) -> None:
        b = fc.checked(body, fc.SNAPSHOT_CREATE)
        self._running()
        self.vm.create_snapshot(b["snapshot_path"], b["snapshot_type"])

    def put_snapshot_load(self, body: Body, ids: list[str]) -> None:
        b = fc.checked(body, fc.SNAPSHOT_LOAD)
        self._preboot()
        self.vm.load_snapshot(b["snapshot_path"], resume=b["resume_vm"])

    def get_vm_config(self, body: Body, ids: list[str]) -> Response:
        return Response(200, fc.render(self.vm.config, self.vm.telemetry))

    def put_stellar_device(self, body: Body, ids: list[str]) -> None:
        reason = fc.api_id_problem(ids[0])
        if reason:
            raise Fault(reason)
        spec = fc.stellar_device(body, ids[0])
        self._put(spec, (spec.plugin,), f"device {spec.id}")

    def put_stellar_migrate(self, body: Body, ids: list[str]) -> Response:
        b = fc.checked(body, fc.MIGRATE)
        self._running()
        return Response(200, self.vm.migrate(b["to"], b["timeout_s"]))

    def get_stellar_metrics(self, body: Body, ids: list[str]) -> Response:
        return Response(200, self.vm.metrics_line())

