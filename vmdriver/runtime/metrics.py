"""Prometheus metrics of a supervisor's VMs, on an optional HTTP endpoint.

A poller on the supervisor's event loop samples every VM (QEMU's CPU and RSS with
psutil, the guest's memory, block and network counters over QMP and the agent)
into a snapshot; scrapes, on prometheus-client's server thread, only read that
snapshot, so a scrape never waits on a VM. The registry is our own (never the
process-global one), so nothing else leaks into the endpoint.

Cardinality is bounded: per-VM series carry only ``vm`` (the VM id) and ``task``
(its task name), and go away when the supervisor forgets the VM; the state is the
gauge's value, not a label; the other labels take a fixed handful of values
(``mode``, ``kind``, ``direction``, ``outcome``). See docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any
from wsgiref.simple_server import WSGIServer

import psutil
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vmdriver.errors import InputError, VmdriverError
from vmdriver.runtime.guest_stats import GuestStats, GuestStatsSampler, spec_of
from vmdriver.runtime.state import ExitKind, VMState
from vmdriver.runtime.stats import ProcessSampler
from vmdriver.runtime.supervisor import Supervisor

log = logging.getLogger(__name__)

#: The ``vmdriver_vm_state`` value of each state (documented in docs/metrics.md).
STATE_VALUES = {s: i for i, s in enumerate(VMState)}
POLL_INTERVAL_S = 5.0
PREFIX = "vmdriver"


@dataclass
class VmSnapshot:
    """What the last poll saw of one VM."""

    task: str
    state: VMState = VMState.LAUNCHING
    start_seconds: float | None = None
    boot_seconds: float | None = None
    cpu_user_s: float = 0.0
    cpu_system_s: float = 0.0
    rss: int = 0
    guest: GuestStats | None = None


@dataclass
class _Poll:
    """Samplers kept between polls (CPU percentages need the previous sample)."""

    process: ProcessSampler | None = None
    guest: GuestStatsSampler | None = None


def parse_address(addr: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` → (host, port); host defaults to 127.0.0.1."""
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = "", addr
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise InputError("not a listen address", where="metrics address", value=addr,
                         allowed=["HOST:PORT", "[IPV6]:PORT", ":PORT", "PORT"])
    return host, number


class VmMetrics(Collector):
    """The metrics of one supervisor; :meth:`serve` exposes them, :meth:`poll` feeds them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._vms: dict[str, VmSnapshot] = {}
        self._stops: dict[str, int] = {k.name.lower(): 0 for k in ExitKind}
        self._polls: dict[str, _Poll] = {}
        self.server: WSGIServer | None = None
        self.registry.register(self)

    # Section: what faces tell us

    def started(self, vm_id: str, task: str, seconds: float) -> None:
        """The VM runs, ``seconds`` after it was asked for."""
        with self._lock:
            snap = self._vms.setdefault(vm_id, VmSnapshot(task))
            snap.start_seconds, snap.state = seconds, VMState.RUNNING

    def booted(self, vm_id: str, seconds: float) -> None:
        """The guest answered (its agent), ``seconds`` after QEMU started."""
        with self._lock:
            if vm_id in self._vms and self._vms[vm_id].boot_seconds is None:
                self._vms[vm_id].boot_seconds = seconds

    def stopped(self, kind: ExitKind) -> None:
        """Count a VM's end by how it ended."""
        with self._lock:
            self._stops[kind.name.lower()] += 1

    # Section: serving

    def serve(self, addr: str) -> tuple[str, int]:
        """Listen on ``addr`` in a daemon thread; the (host, port) actually bound."""
        host, port = parse_address(addr)
        try:
            self.server, _thread = start_http_server(port, host, self.registry)
        except OSError as exc:
            raise VmdriverError(f"metrics: cannot listen on {addr}: {exc.strerror}") from None
        bound = self.server.server_address
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        """Stop serving."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    # Section: polling

    async def poll(self, sup: Supervisor, task_of: Callable[[str], str],
                   interval: float = POLL_INTERVAL_S) -> None:
        """Sample every VM of ``sup`` every ``interval`` seconds, until cancelled."""
        while True:
            await self.poll_once(sup, task_of)
            await asyncio.sleep(interval)

    async def poll_once(self, sup: Supervisor, task_of: Callable[[str], str]) -> None:
        """One round over the supervisor's VMs; forgotten VMs lose their series."""
        ids = set(sup.ids())
        for vm_id in ids:
            with contextlib.suppress(VmdriverError):
                await self._poll_vm(sup, vm_id, task_of(vm_id))
        with self._lock:
            for gone in set(self._vms) - ids:
                del self._vms[gone]
                self._polls.pop(gone, None)

    async def _poll_vm(self, sup: Supervisor, vm_id: str, task: str) -> None:
        info = sup.info(vm_id)
        poll = self._polls.setdefault(vm_id, _Poll())
        with self._lock:
            snap = self._vms.setdefault(vm_id, VmSnapshot(task))
            snap.state = info.state
        if info.result is not None:
            return  # the face counts the outcome (stopped()); nothing left to sample
        if info.pid is not None:
            with contextlib.suppress(psutil.Error):
                poll.process = poll.process or ProcessSampler(info.pid)
                s = poll.process.sample()
                with self._lock:
                    snap.cpu_user_s, snap.cpu_system_s, snap.rss = s.user_s, s.system_s, s.rss
        if poll.guest is None:
            spec = spec_of(sup, vm_id)
            agent = sup.agent(vm_id) if spec.guest_agent else None
            poll.guest = GuestStatsSampler(vm_id, spec, lambda c, a: sup.qmp(vm_id, c, a), agent)
        guest = await poll.guest.sample()
        with self._lock:
            snap.guest = guest

    # Section: the collector

    def collect(self) -> Iterable[Any]:
        """Render the snapshot (called by prometheus-client on each scrape)."""
        with self._lock:
            vms = {k: replace(v) for k, v in self._vms.items()}
            stops = dict(self._stops)
        yield from _families(vms, stops)


@dataclass
class _Families:
    """Metric families being filled, by name."""

    items: dict[str, Any] = field(default_factory=dict)

    def gauge(self, name: str, doc: str, labels: list[str], unit: str = "") -> GaugeMetricFamily:
        key = f"{PREFIX}_{name}"
        fam = self.items.setdefault(key, GaugeMetricFamily(key, doc, labels=labels, unit=unit))
        assert isinstance(fam, GaugeMetricFamily)
        return fam

    def counter(self, name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
        key = f"{PREFIX}_{name}"
        fam = self.items.setdefault(key, CounterMetricFamily(key, doc, labels=labels))
        assert isinstance(fam, CounterMetricFamily)
        return fam


def _families(vms: dict[str, VmSnapshot], stops: dict[str, int]) -> Iterable[Any]:
    f = _Families()
    vl = ["vm", "task"]
    f.gauge("vms", "VMs this supervisor knows", []).add_metric([], len(vms))
    state = f.gauge("vm_state", "0 defined, 1 launching, 2 running, 3 stopping, 4 exited", vl)
    start = f.gauge("vm_start_seconds", "Seconds from the start request until QEMU ran", vl)
    boot = f.gauge("vm_boot_seconds", "Seconds from QEMU's start until the guest agent answered", vl)
    cpu = f.counter("vm_cpu_seconds", "CPU seconds used by QEMU", [*vl, "mode"])
    rss = f.gauge("vm_rss_bytes", "Resident memory of the QEMU process", vl)
    mem = f.gauge("guest_memory_bytes", "The guest kernel's memory (balloon statistics)",
                  [*vl, "kind"])
    blk = f.counter("guest_block_bytes", "Bytes the guest read and wrote on its disks",
                    [*vl, "direction"])
    net = f.counter("guest_network_bytes", "Bytes the guest received and transmitted",
                    [*vl, "direction"])
    for vm_id, s in sorted(vms.items()):
        lv = [vm_id, s.task]
        state.add_metric(lv, STATE_VALUES[s.state])
        if s.start_seconds is not None:
            start.add_metric(lv, s.start_seconds)
        if s.boot_seconds is not None:
            boot.add_metric(lv, s.boot_seconds)
        cpu.add_metric([*lv, "user"], s.cpu_user_s)
        cpu.add_metric([*lv, "system"], s.cpu_system_s)
        rss.add_metric(lv, s.rss)
        g = s.guest
        if g and g.memory:
            m = g.memory
            for kind, value in (("total", m.total), ("free", m.free), ("available", m.available),
                                ("caches", m.caches), ("used", m.used)):
                mem.add_metric([*lv, kind], value)
        if g and g.block:
            blk.add_metric([*lv, "read"], g.block.read_bytes)
            blk.add_metric([*lv, "write"], g.block.write_bytes)
        if g and g.net:
            net.add_metric([*lv, "receive"], g.net.read_bytes)
            net.add_metric([*lv, "transmit"], g.net.write_bytes)
    outcome = f.counter("vm_stops", "VMs that ended, by how", ["outcome"])
    for name, count in sorted(stops.items()):
        outcome.add_metric([name], count)
    return list(f.items.values())
