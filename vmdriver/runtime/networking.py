"""The supervisor's side of tap and macvtap NICs (the host work is :mod:`vmdriver.network`).

Per VM: taps are created (on their bridges) before QEMU starts and reach it as
fds, so QEMU needs no network privileges; once the guest has an address its
published ports are forwarded by nftables; everything is removed when QEMU
exits, and after a crash by :meth:`Networks.reconcile`. Per supervisor: the
managed networks' bridges and dnsmasq, started on first use and stopped with
:meth:`Networks.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmdriver.host.config import HostConfig
from vmdriver.network import nft
from vmdriver.network.discovery import GuestAddresses
from vmdriver.network.manager import HostNetwork, NicRequest, VmNetwork
from vmdriver.qemu.context import NicFds
from vmdriver.qemu.sidecars import HelperSpec
from vmdriver.runtime.helpers import Helper, start_helper, stop_helpers
from vmdriver.runtime.netconfig import network_settings
from vmdriver.spec import MacvtapNic, TapNic, VMSpec

log = logging.getLogger(__name__)

#: How long to look for a guest's address after start, and how often.
ADDRESS_BOUND_S = 30.0
_ADDRESS_POLL_S = 0.5


def nic_requests(spec: VMSpec) -> list[NicRequest]:
    """The spec's tap and macvtap NICs, numbered by their place among all NICs."""
    out = []
    for index, nic in enumerate(spec.nics):
        if isinstance(nic, TapNic):
            out.append(NicRequest(index, "tap", id=nic.id, bridge=nic.bridge, mac=nic.mac or ""))
        elif isinstance(nic, MacvtapNic):
            out.append(NicRequest(index, "macvtap", id=nic.id, device=nic.device, mode=nic.mode,
                                  mac=nic.mac or ""))
    return out


@dataclass
class VmLinks:
    """One VM's host-side NICs and what the guest was found to have."""

    vmnet: VmNetwork
    addresses: GuestAddresses = field(default_factory=GuestAddresses)
    watcher: asyncio.Task[None] | None = None


class Networks:
    """Networking of one supervisor."""

    def __init__(self, host: HostConfig) -> None:
        self.settings = network_settings(host)
        self.host = HostNetwork(self.settings, host.state_dir / "net")
        self._dnsmasq: dict[str, Helper] = {}

    async def attach(self, vm_id: str, spec: VMSpec) -> tuple[VmLinks | None, dict[str, NicFds]]:
        """Taps and macvtaps for ``spec``; fds for QEMU (its own copies: close them after spawn)."""
        reqs = nic_requests(spec)
        if not reqs:
            return None, {}
        self.host.check(reqs)
        for req in reqs:
            await self._ensure_managed(req.bridge)
        vmnet = await asyncio.to_thread(self.host.attach, vm_id, reqs)
        try:
            fds = {nic_id: NicFds(os.dup(tap), os.dup(vhost) if vhost is not None else None)
                   for nic_id, (tap, vhost) in vmnet.fds_by_id().items()}
        finally:
            # QEMU gets the dups; a tap disappears when its last fd (QEMU's) closes.
            vmnet.close_fds()
        return VmLinks(vmnet), fds

    async def _ensure_managed(self, bridge: str) -> None:
        net = self.settings.network_for_bridge(bridge)
        if net is None or net.name in self._dnsmasq:
            return
        await asyncio.to_thread(self.host.ensure_network, net)
        if not net.dhcp and not net.dns:
            return
        argv = tuple(await asyncio.to_thread(self.host.dnsmasq_argv, net))
        spec = HelperSpec(f"dnsmasq-{net.name}", argv, None,
                          ready_check=lambda: self.host.dnsmasq_ready(net))
        logs = self.host.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self._dnsmasq[net.name] = await start_helper(spec, logs, {"PATH": os.environ.get("PATH", "")})

    def publish_later(self, links: VmLinks, spec: VMSpec, agent: Callable[[], Any] | None,
                      on_found: Callable[[GuestAddresses], None]) -> None:
        """Find the guest's address (bounded), then forward its published ports."""
        ports = [nft.PortMap(f.host_port, f.guest_port, f.protocols,
                             ipaddress.ip_address(f.host_ip) if f.host_ip else None)
                 for nic in spec.nics if isinstance(nic, TapNic) for f in nic.forwards]
        links.watcher = asyncio.create_task(self._publish(links, ports, agent, on_found),
                                            name=f"addresses of {links.vmnet.vm_id}")

    async def _publish(self, links: VmLinks, ports: Sequence[nft.PortMap],
                       agent: Callable[[], Any] | None,
                       on_found: Callable[[GuestAddresses], None]) -> None:
        deadline = time.monotonic() + ADDRESS_BOUND_S
        first = min((n.request.index for n in links.vmnet.nics), default=0)
        while time.monotonic() < deadline:
            found = await asyncio.to_thread(self.host.discover, links.vmnet, first, agent)
            if found:
                links.addresses = found
                if ports:
                    await asyncio.to_thread(self.host.publish, links.vmnet.vm_id, ports,
                                            found.addresses)
                await asyncio.to_thread(self.host.guard_addresses, links.vmnet, {first: found})
                on_found(found)
                return
            await asyncio.sleep(_ADDRESS_POLL_S)
        log.warning("VM %s: no guest address within %.0fs; ports not published",
                    links.vmnet.vm_id, ADDRESS_BOUND_S)

    async def detach(self, vm_id: str, links: VmLinks | None) -> None:
        """Remove a VM's chains and links (also after a re-attach, found by the VM's key)."""
        if links is not None and links.watcher is not None:
            links.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await links.watcher
        await asyncio.to_thread(self.host.detach, vm_id, links.vmnet if links else None)

    async def reconcile(self, known: Sequence[str]) -> None:
        """Remove what a crashed supervisor left of VMs that are gone."""
        done = await asyncio.to_thread(self.host.reconcile, known)
        if any((done.links, done.chains, done.dnsmasq, done.bridges)):
            log.info("reconciled networking: %s", done)

    async def close(self) -> None:
        """Stop the managed networks' dnsmasq (bridges stay for the next run)."""
        await stop_helpers(list(self._dnsmasq.values()))
        self._dnsmasq.clear()

    @property
    def managed(self) -> Mapping[str, Path]:
        """Managed network names and their state dirs."""
        return {name: self.host.state_dir / name for name in self.settings.networks}
