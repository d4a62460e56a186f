"""A VM's guest coming up, as events: guest ready, guest agent connected, IP known.

Faces turn the events into what their users read: Nomad TaskEvents (the plugin),
lines on `vmdriver run`'s stderr, metrics (boot duration). The watch polls
cheaply (one agent ping per second until it answers, the supervisor's view of
the addresses) and ends once everything was seen, the VM ended, or it gave up.

- *guest ready*: the first sign of the guest's user space: its agent answers, or
  it has an address (tap NICs: found by the supervisor's discovery).
- *guest agent connected*: ``guest-ping`` answered (VMs with ``guest_agent``).
- *IP known*: the supervisor found the guest's addresses on its tap NICs; for
  user-mode NICs the agent's ``guest-network-get-interfaces`` (the guest-side
  address, not reachable from the host).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any

from vmdriver.errors import MonitorError, VmdriverError
from vmdriver.qemu.agent import GuestAgent
from vmdriver.runtime.guest_stats import host_links, spec_of
from vmdriver.runtime.supervisor import Supervisor

log = logging.getLogger(__name__)

#: ``emit(kind, message, annotations)``; kinds: "ready", "agent", "ip".
GuestEventSink = Callable[[str, str, dict[str, str]], None]
WATCH_INTERVAL_S = 1.0
#: Stop watching a guest that never shows up after this long.
WATCH_LIMIT_S = 900.0


def agent_addresses(interfaces: list[dict[str, Any]]) -> tuple[str, ...]:
    """Addresses of the guest's NICs other than loopback: IPv4 and global IPv6."""
    out = []
    for iface in interfaces:
        if iface.get("name") == "lo":
            continue
        for a in iface.get("ip-addresses") or ():
            try:
                ip = ipaddress.ip_address(str(a.get("ip-address", "")))
            except ValueError:
                continue
            if ip.version == 4 or ip.is_global:
                out.append(str(ip))
    return tuple(out)


class GuestWatch:
    """Watches one VM's guest; :meth:`run` until done."""

    def __init__(self, sup: Supervisor, vm_id: str, emit: GuestEventSink) -> None:
        self.sup, self.vm_id, self.emit = sup, vm_id, emit
        spec = spec_of(sup, vm_id)
        self.agent: GuestAgent | None = sup.agent(vm_id) if spec.guest_agent else None
        #: Tap NICs: the supervisor's discovery finds the addresses.
        self.taps = bool(host_links(vm_id, spec))
        self.ready = self.connected = False
        #: A VM without NICs has no IP to wait for.
        self.ip_known = all(nic.kind == "none" for nic in spec.nics)

    def _since_start(self) -> float:
        return max(0.0, time.time() - self.sup.info(self.vm_id).started_at)

    async def run(self, interval: float = WATCH_INTERVAL_S, limit: float = WATCH_LIMIT_S) -> None:
        """Poll until ready, connected (with an agent) and the IP are known, or the VM ends."""
        if self.agent is None and not self.taps:
            return  # nothing in this VM can tell us about its guest
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and not self._done():
            try:
                if self.sup.info(self.vm_id).result is not None:
                    return
                await self.step()
            except VmdriverError as exc:
                log.debug("guest watch of %s: %s", self.vm_id, exc)
            await asyncio.sleep(interval)

    def _done(self) -> bool:
        return self.ready and self.ip_known and (self.agent is None or self.connected)

    async def step(self) -> None:
        """One look at the guest."""
        if self.agent is not None and not self.connected and await self.agent.ping(1.0):
            self.connected = True
            secs = self._since_start()
            self._ready(secs)
            self.emit("agent", f"guest agent connected ({secs:.1f}s after start)",
                      {"seconds": f"{secs:.3f}"})
        if not self.ip_known:
            addrs = await self._addresses()
            if addrs:
                self.ip_known = True
                self._ready(self._since_start())
                self.emit("ip", f"IP known: {', '.join(addrs)}", {"addresses": ",".join(addrs)})

    def _ready(self, secs: float) -> None:
        if not self.ready:
            self.ready = True
            self.emit("ready", f"guest ready ({secs:.1f}s after start)", {"seconds": f"{secs:.3f}"})

    async def _addresses(self) -> tuple[str, ...]:
        found = self.sup.info(self.vm_id).addresses
        if found or self.agent is None or not self.connected:
            return tuple(found)
        try:
            return agent_addresses(await self.agent.interfaces())
        except MonitorError:
            return ()
