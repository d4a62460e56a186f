"""The supervisor's side of tap and macvtap NICs (the host work is :mod:`vmdriver.network`).

Per VM: taps are created (on their bridges) before QEMU starts and reach it as
fds, so QEMU needs no network privileges; the guest's addresses are watched for
the VM's whole life (agent, then leases, then neighbours) and its published
ports follow them; everything is removed when QEMU exits, and after a crash by
:meth:`Networks.reconcile`. Per supervisor: the managed networks' bridges and
dnsmasq, started on first use (or on recovery) and stopped with :meth:`Networks.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmdriver.host.config import HostConfig
from vmdriver.network import dnsmasq, nft
from vmdriver.network.discovery import GuestAddresses
from vmdriver.network.manager import HostNetwork, NicRequest, VmNetwork
from vmdriver.network.spec import nic_requests as spec_nic_requests
from vmdriver.network.spec import port_maps as spec_port_maps
from vmdriver.qemu.agent import GuestAgent
from vmdriver.qemu.context import NicFds
from vmdriver.qemu.sidecars import HelperSpec
from vmdriver.runtime.helpers import Helper, start_helper, stop_helpers
from vmdriver.runtime.netconfig import ADDRESSES_FILE, address_wait, network_settings, saved_addresses
from vmdriver.runtime.process import ManagedProcess, process_start_time
from vmdriver.runtime.record import records_under
from vmdriver.spec import TapNic, VMSpec

if TYPE_CHECKING:
    from vmdriver.runtime.vm import VM

log = logging.getLogger(__name__)

#: Polling for a guest's first address (after a first delay), and for changes once it has one.
_FIRST_DELAY_S = 1.0
_FIRST_POLL_S = 1.0
_WATCH_POLL_S = 10.0
#: After the bound passes without an address, look less often (the guest may
#: still come up: a slow TCG boot, DHCP retries).
_LATE_POLL_S = 2.0
#: A guest agent that does not answer this fast is not up yet.
AGENT_TIMEOUT_S = 2.0
#: Called with the guest's addresses each time they change.
AddressListener = Callable[[GuestAddresses], None]
#: The guest agent's ``guest-network-get-interfaces`` (:meth:`GuestAgent.interfaces`).
AgentCall = Callable[[], Awaitable[list[dict[str, Any]]]]


def nic_requests(spec: VMSpec) -> list[NicRequest]:
    """The spec's tap and macvtap NICs, numbered by their place among all NICs."""
    return spec_nic_requests(spec.nics)


def port_maps(spec: VMSpec) -> list[nft.PortMap]:
    """Every tap NIC's published ports."""
    return spec_port_maps([f for n in spec.nics if isinstance(n, TapNic) for f in n.forwards])


@dataclass
class VmLinks:
    """One VM's host-side NICs and what the guest was found to have."""

    vmnet: VmNetwork
    ports: list[nft.PortMap] = field(default_factory=list)
    addresses: GuestAddresses = field(default_factory=GuestAddresses)
    #: Set once the guest has an address (waiters: Nomad's StartTask).
    found: asyncio.Event = field(default_factory=asyncio.Event)
    listeners: list[AddressListener] = field(default_factory=list)
    #: Where the addresses are written for `vmdriver ps` (in the VM's runtime dir).
    address_file: Path | None = None
    watcher: asyncio.Task[None] | None = None

    @property
    def first_index(self) -> int:
        """The NIC whose addresses are the VM's (its first tap or macvtap)."""
        return min((n.request.index for n in self.vmnet.nics), default=0)

    def update(self, found: GuestAddresses) -> None:
        """Record new addresses: file, event, listeners (a failing listener is logged)."""
        self.addresses = found
        if self.address_file is not None:
            with contextlib.suppress(OSError):
                self.address_file.write_text(json.dumps(
                    {"addresses": [str(a) for a in found.addresses], "source": found.source}))
        self.found.set()
        for listener in list(self.listeners):
            try:
                listener(found)
            except Exception:
                log.exception("VM %s: address listener failed", self.vmnet.vm_id)

    async def wait(self, timeout: float) -> GuestAddresses:
        """The addresses, waiting up to ``timeout`` for the first ones, or until the
        VM is gone (its watcher ends with it): a dead VM's start does not wait the bound."""
        if self.found.is_set() or timeout <= 0:
            return self.addresses
        found = asyncio.ensure_future(self.found.wait())
        waits: list[asyncio.Future[Any]] = [found]
        if self.watcher is not None:
            waits.append(self.watcher)
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            found.cancel()
        return self.addresses


class Networks:
    """Networking of one supervisor."""

    def __init__(self, host: HostConfig) -> None:
        self.settings = network_settings(host)
        self.host = HostNetwork(self.settings, host.state_dir / "net")
        #: How long the guest's first address is looked for before a warning (and
        #: how long Nomad's StartTask waits for it).
        self.address_bound_s = address_wait(host)
        self.state_dir = host.state_dir
        self._dnsmasq: dict[str, Helper] = {}
        self._links: dict[str, VmLinks] = {}
        self._reconciled = False
        self._lock = asyncio.Lock()
        self._lookups: ThreadPoolExecutor | None = None
        #: Managed networks whose dnsmasq another live supervisor owns.
        self._shared: set[str] = set()

    async def attach(self, vm_id: str, spec: VMSpec) -> tuple[VmLinks | None, dict[str, NicFds]]:
        """Taps and macvtaps for ``spec``; fds for QEMU (its own copies: close them after spawn).

        The operator's policy is checked first: a refused bridge or device
        creates nothing. The first attach of a supervisor removes what a crashed
        one left (links and chains of VMs that no longer run).
        """
        reqs = nic_requests(spec)
        if not reqs:
            return None, {}
        self.host.check(reqs)
        async with self._lock:
            # Once, and before this supervisor has links of its own that a
            # concurrent start's reconcile could take for a dead VM's.
            if not self._reconciled:
                await self.reconcile(self.known())
            # Under the lock: VMs started together must not each start a dnsmasq.
            for req in reqs:
                await self._ensure_managed(req.bridge)
        vmnet = await asyncio.to_thread(self.host.attach, vm_id, reqs)
        fds: dict[str, NicFds] = {}
        try:
            for nic_id, (tap, vhost) in vmnet.fds_by_id().items():
                fds[nic_id] = NicFds(os.dup(tap))
                if vhost is not None:
                    fds[nic_id] = NicFds(fds[nic_id].tap, os.dup(vhost))
        except OSError:  # out of fds: undo it all
            for got in fds.values():
                for fd in got.all:
                    os.close(fd)
            await asyncio.to_thread(self.host.detach, vm_id, vmnet)
            raise
        finally:
            # QEMU gets the dups; a tap disappears when its last fd (QEMU's) closes.
            vmnet.close_fds()
        links = VmLinks(vmnet, port_maps(spec))
        self._links[vm_id] = links
        return links, fds

    async def recover(self, vm_id: str, spec: VMSpec) -> VmLinks | None:
        """Links of a VM whose QEMU outlived the supervisor that started it.

        What the dead supervisor left of VMs that no longer run is removed, the
        managed networks' dnsmasq is restarted under this supervisor (the leases
        file stays), and the VM's chains keep forwarding until discovery refreshes them.
        """
        reqs = nic_requests(spec)
        async with self._lock:
            await self.reconcile(self.known())
            for req in reqs:
                await self._ensure_managed(req.bridge)
        if not reqs:
            return None
        vmnet = await asyncio.to_thread(self.host.recover, vm_id, reqs)
        links = VmLinks(vmnet, port_maps(spec))
        self._links[vm_id] = links
        return links

    def known(self) -> list[str]:
        """Ids of VMs whose networking must stay: this supervisor's, and every VM
        recorded under the state dir whose QEMU still runs (another supervisor's)."""
        running = []
        for rec in records_under(self.state_dir):
            proc = ManagedProcess.attach(rec.pid, rec.pid_start_time)
            if proc is not None:
                proc.close()
                running.append(rec.id)
        return [*self._links, *running]

    async def _ensure_managed(self, bridge: str) -> None:
        net = self.settings.network_for_bridge(bridge)
        if net is None or net.name in self._dnsmasq or net.name in self._shared:
            return
        await asyncio.to_thread(self.host.ensure_network, net)
        if not net.dhcp and not net.dns:
            return
        owner = dnsmasq.network_dir(self.host.state_dir, net) / "owner"
        if _other_owner_alive(owner) and self.host.dnsmasq_ready(net):
            # Another live supervisor on this state dir runs it (`vmdriver stop` while
            # `vmdriver run` goes on): use it, never stop it.
            self._shared.add(net.name)
            return
        # Stops a dnsmasq a crashed supervisor left (found by its pid file) first.
        argv = tuple(await asyncio.to_thread(self.host.dnsmasq_argv, net))
        spec = HelperSpec(f"dnsmasq-{net.name}", argv, None,
                          ready_check=lambda: self.host.dnsmasq_ready(net))
        logs = self.host.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self._dnsmasq[net.name] = await start_helper(spec, logs, {"PATH": os.environ.get("PATH", "")})
        owner.write_text(f"{os.getpid()} {process_start_time(os.getpid())}")

    def watch_vm(self, links: VmLinks, vm: VM, on_change: AddressListener) -> None:
        """Look for a launched (or re-attached) VM's addresses for its life, publishing
        and guarding them as they are learned; written to its runtime dir for `ps`."""
        links.listeners.append(on_change)
        links.address_file = address_file(vm.dirs.runtime)
        saved = saved_addresses(vm.dirs.runtime)
        if saved and not links.addresses:
            # Re-attached: what the dead supervisor learned stays learned (and locked);
            # its chains kept forwarding to these addresses all along.
            with contextlib.suppress(ValueError):
                links.update(_from_strings(saved))
        agent = GuestAgent(vm.dirs.qga_socket).interfaces if vm.spec.guest_agent else None
        links.watcher = asyncio.create_task(self._watch(links, agent),
                                            name=f"addresses of {links.vmnet.vm_id}")

    async def _watch(self, links: VmLinks, agent: AgentCall | None) -> None:
        deadline = time.monotonic() + self.address_bound_s
        warned = False
        # No guest has an address this early: the start (and a burst of them) goes first.
        await asyncio.sleep(_FIRST_DELAY_S)
        while True:
            found = await self._discover(links, agent)
            learned = learn(links.addresses, found)
            if learned is not None:
                await self._apply(links, learned)
            if not links.addresses and not warned and time.monotonic() > deadline:
                warned = True
                log.warning("VM %s: no guest address within %.0fs; ports are published "
                            "once it has one", links.vmnet.vm_id, self.address_bound_s)
            await asyncio.sleep(_WATCH_POLL_S if links.addresses
                                else _LATE_POLL_S if warned else _FIRST_POLL_S)

    async def _discover(self, links: VmLinks, agent: AgentCall | None) -> GuestAddresses:
        """One look-up. The agent (async, on this loop) is asked here, not from the
        network layer's thread, so no thread waits on a guest whose agent is not up;
        the look-ups run on threads of their own, so many VMs polling never delay
        the default pool that VM starts use."""
        answer: list[dict[str, Any]] | None = None
        if agent is not None:
            with contextlib.suppress(Exception):
                answer = await asyncio.wait_for(agent(), AGENT_TIMEOUT_S)
        if self._lookups is None:
            self._lookups = ThreadPoolExecutor(2, thread_name_prefix="vmdriver-addresses")
        lookup = functools.partial(self.host.discover, links.vmnet, links.first_index,
                                   (lambda: answer) if answer else None)
        return await asyncio.get_running_loop().run_in_executor(self._lookups, lookup)

    async def _apply(self, links: VmLinks, found: GuestAddresses) -> None:
        vm_id = links.vmnet.vm_id
        try:
            if links.ports:
                await asyncio.to_thread(self.host.publish, vm_id, links.ports, found.addresses)
            await asyncio.to_thread(self.host.guard_addresses, links.vmnet,
                                    {links.first_index: found})
        except Exception as exc:
            log.warning("VM %s: publishing ports to %s failed: %s", vm_id,
                      ", ".join(map(str, found.addresses)), exc)
            return
        log.info("VM %s: guest address %s (from %s)", vm_id,
                 ", ".join(map(str, found.addresses)), found.source)
        links.update(found)

    async def detach(self, vm_id: str, links: VmLinks | None) -> None:
        """Remove a VM's chains and links (also after a re-attach, found by the VM's key)."""
        self._links.pop(vm_id, None)
        if links is not None and links.watcher is not None:
            links.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await links.watcher
        await asyncio.to_thread(self.host.detach, vm_id, links.vmnet if links else None)

    async def reconcile(self, known: Sequence[str]) -> None:
        """Remove what a crashed supervisor left of VMs that are gone."""
        self._reconciled = True
        done = await asyncio.to_thread(self.host.reconcile, known)
        if any((done.links, done.chains, done.dnsmasq, done.bridges)):
            log.info("reconciled networking: %s", done)

    async def close(self) -> None:
        """Stop watching addresses and the managed networks' dnsmasq (bridges stay for
        the next run; VMs still running keep their links and chains for whoever re-attaches)."""
        for links in self._links.values():
            if links.watcher is not None:
                links.watcher.cancel()
        await stop_helpers(list(self._dnsmasq.values()))
        self._dnsmasq.clear()
        if self._lookups is not None:
            self._lookups.shutdown(wait=False, cancel_futures=True)
            self._lookups = None

    @property
    def managed(self) -> Mapping[str, Path]:
        """Managed network names and their state dirs."""
        return {name: self.host.state_dir / name for name in self.settings.networks}


def learn(old: GuestAddresses, new: GuestAddresses) -> GuestAddresses | None:
    """The addresses known so far plus what ``new`` adds; None if it adds nothing.

    Each family is learned once, then locked, as libvirt's IP learning does: the
    agent's answer and the neighbour table are the guest's word, and the
    anti-spoofing guard and the published ports follow these addresses, so a
    guest that claims another address later gets neither. A family first seen
    later (IPv6 after the DHCP lease) is added.
    """
    v4, v6 = old.ipv4 or new.ipv4, old.ipv6 or new.ipv6
    if (v4, v6) == (old.ipv4, old.ipv6):
        return None
    return GuestAddresses(v4, v6, old.source or new.source, (*v4, *v6))


def _other_owner_alive(owner: Path) -> bool:
    """True if ``owner`` names a live process other than this one (pid + start time)."""
    try:
        pid_text, start_text = owner.read_text().split()
        pid, start = int(pid_text), float(start_text)
    except (OSError, ValueError):
        return False
    return pid != os.getpid() and process_start_time(pid) == start


def _from_strings(values: Sequence[str]) -> GuestAddresses:
    addrs = [ipaddress.ip_address(v) for v in values]
    v4 = tuple(a for a in addrs if isinstance(a, ipaddress.IPv4Address))
    v6 = tuple(a for a in addrs if isinstance(a, ipaddress.IPv6Address))
    return GuestAddresses(v4, v6, "recovered", (*v4, *v6))


def address_file(runtime_dir: Path) -> Path:
    """Where a VM's addresses are written (read by :func:`~vmdriver.runtime.netconfig.saved_addresses`)."""
    return runtime_dir / ADDRESSES_FILE
