"""What the guest sees and does: its memory (balloon statistics), block and network I/O.

Sources, all in bytes:

- memory: the virtio balloon's statistics (``qom-set guest-stats-polling-interval``
  once, then ``qom-get guest-stats``): the guest kernel's own MemTotal, MemFree,
  MemAvailable and page cache, pushed by its balloon driver. Only with
  ``spec.balloon``; ``None`` until the guest driver has reported once.
- block: ``query-blockstats``, summed over the guest's devices (QEMU's counters
  of what the guest read and wrote through each device).
- network: QEMU 7.2 has no NIC counters over QMP (``query-rx-filter`` has none,
  ``query-stats`` covers KVM only, ``info network`` none either). Tap and macvtap
  NICs are read from the host link's sysfs counters (no guest help needed; the
  host's receive is the guest's transmit, swapped here to the guest's view).
  User-mode NICs have no host link: their counters come from the guest agent's
  ``guest-network-get-interfaces`` statistics (the guest's view, loopback left out),
  when the VM has an agent that answers.

A source that is missing or fails gives ``None`` for its part; sampling never
raises for a VM that runs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmdriver.errors import MonitorError, StateError
from vmdriver.network.names import macvtap_name, tap_name
from vmdriver.qemu.agent import GuestAgent
from vmdriver.runtime.request import QmpCall
from vmdriver.runtime.supervisor import Supervisor
from vmdriver.spec import MacvtapNic, TapNic, VMSpec

log = logging.getLogger(__name__)

#: The balloon device's id in vmdriver's argv (qemu/devices.py).
BALLOON_PATH = "/machine/peripheral/balloon0"
#: Seconds between the guest driver's reports.
BALLOON_POLL_S = 2
#: How long an agent call for network counters may take (stats must not stall).
AGENT_STATS_TIMEOUT_S = 2.0
SYSFS_NET = Path("/sys/class/net")

#: ``qmp(command, arguments)`` of one VM.


@dataclass(frozen=True)
class GuestMemory:
    """The guest kernel's memory view, in bytes."""

    total: int
    free: int
    available: int
    #: Page cache and buffers.
    caches: int
    #: Unix time of the guest driver's report.
    updated_at: float

    @property
    def used(self) -> int:
        """Neither free nor cache (what ``free`` calls used)."""
        return max(0, self.total - self.free - self.caches)


@dataclass(frozen=True)
class IOCounters:
    """Bytes and operations since the VM started, from the guest's point of view."""

    read_bytes: int = 0
    write_bytes: int = 0
    read_ops: int = 0
    write_ops: int = 0


@dataclass(frozen=True)
class GuestStats:
    """One sample; a part is ``None`` where its source is missing."""

    timestamp: float
    memory: GuestMemory | None = None
    #: Block devices: read/write bytes and requests.
    block: IOCounters | None = None
    #: Network: ``read`` is received, ``write`` transmitted, by the guest.
    net: IOCounters | None = None
    #: "tap" (host sysfs) or "agent" (the guest's own counters).
    net_source: str = ""


def parse_balloon(reply: dict[str, Any]) -> GuestMemory | None:
    """``guest-stats`` as :class:`GuestMemory`; ``None`` until the guest reported (-1: unknown)."""
    stats = reply.get("stats") or {}
    updated = float(reply.get("last-update") or 0)

    def get(key: str) -> int:
        value = stats.get(key, -1)
        return int(value) if isinstance(value, int) else -1

    total, free = get("stat-total-memory"), get("stat-free-memory")
    if updated <= 0 or total <= 0 or free < 0:
        return None
    available, caches = get("stat-available-memory"), get("stat-disk-caches")
    return GuestMemory(total, free, available if available >= 0 else free, max(caches, 0), updated)


def parse_blockstats(reply: list[dict[str, Any]]) -> IOCounters:
    """``query-blockstats``: each device's top node, summed (backing nodes are not the guest's I/O)."""
    rd = wr = rops = wops = 0
    for dev in reply:
        s = dev.get("stats") or {}
        rd += int(s.get("rd_bytes", 0))
        wr += int(s.get("wr_bytes", 0))
        rops += int(s.get("rd_operations", 0))
        wops += int(s.get("wr_operations", 0))
    return IOCounters(rd, wr, rops, wops)


def parse_agent_net(interfaces: list[dict[str, Any]]) -> IOCounters | None:
    """``guest-network-get-interfaces`` statistics, summed over every NIC but loopback."""
    rx = tx = rxp = txp = 0
    seen = False
    for iface in interfaces:
        stats = iface.get("statistics")
        if iface.get("name") == "lo" or not stats:
            continue
        seen = True
        rx, tx = rx + int(stats.get("rx-bytes", 0)), tx + int(stats.get("tx-bytes", 0))
        rxp, txp = rxp + int(stats.get("rx-packets", 0)), txp + int(stats.get("tx-packets", 0))
    return IOCounters(rx, tx, rxp, txp) if seen else None


def spec_of(sup: Supervisor, vm_id: str) -> VMSpec:
    """The spec a running VM was started with (from its record: the supervisor keeps no other copy public)."""
    return VMSpec.model_validate(sup.record(vm_id).spec)


def host_links(vm_id: str, spec: VMSpec) -> list[str]:
    """The host links of the VM's tap and macvtap NICs."""
    out = []
    for index, nic in enumerate(spec.nics):  # the index runtime/networking.py names them by
        if isinstance(nic, TapNic):
            out.append(tap_name(vm_id, index))
        elif isinstance(nic, MacvtapNic):
            out.append(macvtap_name(vm_id, index))
    return out


def read_link_counters(links: list[str], root: Path = SYSFS_NET) -> IOCounters | None:
    """Host links' sysfs counters, turned round to the guest's view; ``None`` if none is there."""
    rx = tx = rxp = txp = 0
    found = False
    for link in links:
        base = root / link / "statistics"
        try:
            host_rx, host_tx = int((base / "rx_bytes").read_text()), int((base / "tx_bytes").read_text())
            host_rxp = int((base / "rx_packets").read_text())
            host_txp = int((base / "tx_packets").read_text())
        except (OSError, ValueError):
            continue
        found = True
        rx, tx, rxp, txp = rx + host_tx, tx + host_rx, rxp + host_txp, txp + host_rxp
    return IOCounters(rx, tx, rxp, txp) if found else None


class GuestStatsSampler:
    """Samples one VM's guest statistics; create once per VM and stream."""

    def __init__(self, vm_id: str, spec: VMSpec, qmp: QmpCall,
                 agent: GuestAgent | None = None) -> None:
        self.vm_id, self.spec, self.qmp, self.agent = vm_id, spec, qmp, agent
        self.links = host_links(vm_id, spec)
        self._polling = False

    async def sample(self) -> GuestStats:
        """Measure now (each part ``None`` if its source fails)."""
        net, source = await self._net()
        return GuestStats(time.time(), await self._memory(), await self._block(), net, source)

    async def _memory(self) -> GuestMemory | None:
        if not self.spec.balloon:
            return None
        try:
            if not self._polling:
                # The guest driver reports only while polling is on; it stays on for the VM.
                await self.qmp("qom-set", {"path": BALLOON_PATH,
                                           "property": "guest-stats-polling-interval",
                                           "value": BALLOON_POLL_S})
                self._polling = True
            reply = await self.qmp("qom-get", {"path": BALLOON_PATH, "property": "guest-stats"})
        except (MonitorError, StateError) as exc:
            log.debug("VM %s: balloon stats: %s", self.vm_id, exc)
            return None
        return parse_balloon(reply) if isinstance(reply, dict) else None

    async def _block(self) -> IOCounters | None:
        try:
            reply = await self.qmp("query-blockstats", None)
        except (MonitorError, StateError) as exc:
            log.debug("VM %s: blockstats: %s", self.vm_id, exc)
            return None
        return parse_blockstats(reply) if isinstance(reply, list) else None

    async def _net(self) -> tuple[IOCounters | None, str]:
        if self.links:
            return read_link_counters(self.links), "tap"
        if self.agent is None:
            return None, ""
        with contextlib.suppress(MonitorError):
            reply = await self.agent.call("guest-network-get-interfaces",
                                          timeout=AGENT_STATS_TIMEOUT_S)
            if isinstance(reply, list):
                return parse_agent_net(reply), "agent"
        return None, ""
