"""The host side of VM networking as the runtime calls it: attach, publish, detach, reconcile.

All calls are synchronous and take milliseconds (netlink and one nftables batch
each), so the runtime can run them on a worker thread. They act in the calling
thread's network namespace; tests run them inside namespaces they create.

Life of a VM's network, as the core drives it::

    hn = HostNetwork(settings, state_dir)
    hn.check(nics)                         # before launch: operator policy
    vmnet = hn.attach(vm_id, nics)         # taps/macvtaps + MAC guard
    spawn QEMU with vmnet.pass_fds() and vmnet.netdev_args(); vmnet.close_fds()
    addrs = hn.discover(vmnet, 0, agent)   # poll until found or the bound passes
    hn.publish(vm_id, ports, addrs.addresses); hn.guard_addresses(vmnet, {0: addrs})
    hn.detach(vm_id, vmnet)                # on every exit path
    hn.reconcile(known_vm_ids)             # at start-up / recovery
    vmnet = hn.recover(vm_id, nics)        # re-attaching to a QEMU that outlived vmdriver
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vmdriver.errors import HostError
from vmdriver.network import bridge as bridges
from vmdriver.network import dnsmasq, names, nft
from vmdriver.network.config import LIBVIRT_BRIDGE, ManagedNetwork, NetworkSettings, check_nic
from vmdriver.network.discovery import AgentInterfaces, GuestAddresses, IPAddress, discover
from vmdriver.network.macvtap import create_macvtap
from vmdriver.network.tap import Tap, link_exists, open_tap, remove_link, vmdriver_links


@dataclass(frozen=True)
class NicRequest:
    """One tap or macvtap NIC of a VM, as the spec gives it."""

    #: Position among the VM's NICs (0-15): names the tap, so it is stable across restarts.
    index: int
    kind: Literal["tap", "macvtap"]
    #: The spec's NIC id, to map fds back (``netdev`` ids default to ``net<index>``).
    id: str = ""
    bridge: str = ""
    device: str = ""
    mode: str = "bridge"
    mac: str = ""
    queues: int = 1


@dataclass
class VmNic:
    request: NicRequest
    tap: Tap
    network: ManagedNetwork | None

    @property
    def mac(self) -> str:
        return self.tap.mac


@dataclass
class VmNetwork:
    """A VM's host-side NICs: the fds QEMU inherits and what detach removes."""

    vm_id: str
    nics: list[VmNic] = field(default_factory=list)

    def pass_fds(self) -> tuple[int, ...]:
        return tuple(fd for n in self.nics for fd in n.tap.pass_fds())

    def netdev_args(self) -> list[str]:
        """``-netdev`` values (id: the NIC's id or ``net<index>``) for the fds as numbered now."""
        return [n.tap.netdev(n.request.id or f"net{n.request.index}") for n in self.nics]

    def fds_by_id(self) -> dict[str, tuple[int, int | None]]:
        """NIC id → (tap fd, vhost fd or None): what the core's ``NicFds`` holds (one queue)."""
        return {n.request.id: (n.tap.fds[0], n.tap.vhost_fds[0] if n.tap.vhost_fds else None)
                for n in self.nics}

    def close_fds(self) -> None:
        """Close vmdriver's copies once QEMU has its own (so taps die with QEMU)."""
        for n in self.nics:
            n.tap.close()


@dataclass
class Reconciled:
    """What :meth:`HostNetwork.reconcile` removed."""

    links: list[str] = field(default_factory=list)
    chains: list[str] = field(default_factory=list)
    dnsmasq: list[str] = field(default_factory=list)
    bridges: list[str] = field(default_factory=list)


class HostNetwork:
    """vmdriver's networking on one host (one network namespace)."""

    def __init__(self, settings: NetworkSettings, state_dir: Path) -> None:
        self.settings = settings
        self.state_dir = state_dir

    # --- managed networks ---------------------------------------------------------

    def ensure_network(self, net: ManagedNetwork) -> None:
        """Bridge, gateway addresses and NAT rules; dnsmasq is started separately."""
        bridges.ensure_bridge(net)
        nft.network_rules(net)

    def dnsmasq_argv(self, net: ManagedNetwork) -> list[str]:
        """For the core's helper machinery: stop a crashed run's dnsmasq, then give argv."""
        dnsmasq.stop_orphan(self.state_dir, net)
        return dnsmasq.dnsmasq_argv(net, self.state_dir)

    def dnsmasq_ready(self, net: ManagedNetwork) -> bool:
        return dnsmasq.is_ready(net, self.state_dir)

    def remove_network(self, net: ManagedNetwork) -> None:
        """Undo :meth:`ensure_network` (after the network's dnsmasq is stopped)."""
        nft.remove_network(net.name)
        bridges.remove_bridge(net.bridge)

    # --- VMs ----------------------------------------------------------------------

    def check(self, nics: Sequence[NicRequest], where: str = "network_interface") -> None:
        """Refuse NICs on bridges or devices the operator did not allow (before launch)."""
        for nic in nics:
            check_nic(self.settings, bridge=nic.bridge if nic.kind == "tap" else "",
                      device=nic.device if nic.kind == "macvtap" else "",
                      where=f"{where}[{nic.index}]")

    def attach(self, vm_id: str, nics: Sequence[NicRequest]) -> VmNetwork:
        """Create the VM's taps (on their bridges) and macvtaps, and guard their MACs."""
        self.check(nics)
        vmnet = VmNetwork(vm_id)
        try:
            for nic in nics:
                vmnet.nics.append(self._attach_one(vm_id, nic))
            self._guard(vmnet, {})
        except BaseException:
            self.detach(vm_id, vmnet)
            raise
        return vmnet

    def recover(self, vm_id: str, nics: Sequence[NicRequest]) -> VmNetwork:
        """The VmNetwork of a VM whose QEMU outlived a previous vmdriver: nothing is
        created and no fds are held (QEMU has them), but discovery, guard updates and
        detach (with its lease release) work as for a VM this process attached."""
        vmnet = VmNetwork(vm_id)
        for nic in nics:
            mac = nic.mac or names.default_mac(vm_id, nic.index)
            if nic.kind == "macvtap":
                name, net = names.macvtap_name(vm_id, nic.index), None
            else:
                name = names.tap_name(vm_id, nic.index)
                net = self.settings.network_for_bridge(nic.bridge)
            tap = Tap(name=name, ifindex=0, mac=mac, fds=(), kind=nic.kind, closed=True)
            vmnet.nics.append(VmNic(nic, tap, net))
        return vmnet

    def _attach_one(self, vm_id: str, nic: NicRequest) -> VmNic:
        mac = nic.mac or names.default_mac(vm_id, nic.index)
        alias = f"vmdriver vm={vm_id} nic={nic.index}"[:255]
        if nic.kind == "macvtap":
            tap = create_macvtap(names.macvtap_name(vm_id, nic.index), nic.device, mac=mac,
                                 mode=nic.mode, alias=alias)
            return VmNic(nic, tap, None)
        net = self.settings.network_for_bridge(nic.bridge)
        if net is not None and not link_exists(net.bridge):
            bridges.ensure_bridge(net)  # normally done at start-up
        tap = open_tap(names.tap_name(vm_id, nic.index), guest_mac=mac, queues=nic.queues,
                       alias=alias, bridge=nic.bridge)
        if nic.bridge == LIBVIRT_BRIDGE or net is None:
            # A bridge vmdriver does not manage (virbr0 is used as is); the host's
            # own connections to 127.0.0.1:port still need this to reach the guest.
            with contextlib.suppress(HostError):
                bridges.sysctl(f"net.ipv4.conf.{nic.bridge}.route_localnet", "1")
        return VmNic(nic, tap, net)

    def discover(self, vmnet: VmNetwork, index: int = 0, agent: AgentInterfaces | None = None
                 ) -> GuestAddresses:
        """One look-up of NIC ``index``'s addresses (the caller polls)."""
        nic = next(n for n in vmnet.nics if n.request.index == index)
        net = nic.network
        return discover(nic.mac, agent=agent,
                        leases=dnsmasq.leases_file(self.state_dir, net) if net and net.dhcp else None,
                        bridge=nic.request.bridge or None,
                        ipv6_prefix=net.ipv6_subnet if net else None)

    def publish(self, vm_id: str, ports: Sequence[nft.PortMap], addrs: Sequence[IPAddress],
                host_ips: Sequence[IPAddress] = ()) -> None:
        """Forward host ports to the guest (call again when its addresses change)."""
        nft.publish(vm_id, ports, addrs, host_ips)

    def guard_addresses(self, vmnet: VmNetwork, found: Mapping[int, GuestAddresses]) -> None:
        """Tighten the anti-spoofing rules to the guest's known addresses."""
        self._guard(vmnet, found)

    def _guard(self, vmnet: VmNetwork, found: Mapping[int, GuestAddresses]) -> None:
        taps = []
        for n in vmnet.nics:
            got = found.get(n.request.index, GuestAddresses())
            g = nft.Guard(n.tap.name, n.mac, got.ipv4, got.ipv6)
            if n.tap.kind == "tap":
                taps.append(g)
            else:
                nft.guard_macvtap(vmnet.vm_id, n.request.index, g)
        if taps:
            nft.guard(vmnet.vm_id, taps)

    def detach(self, vm_id: str, vmnet: VmNetwork | None = None) -> None:
        """Remove everything of a VM: its chains in one transaction, then its links.

        Safe to call more than once and with nothing attached; ``vmnet`` also
        closes fds still held (a start that failed before QEMU got them) and
        releases the NICs' DHCP leases on managed networks.
        """
        nft.remove_vm(vm_id)
        if vmnet is not None:
            vmnet.close_fds()
            for n in vmnet.nics:
                if n.network is not None and n.network.dhcp:
                    dnsmasq.release_lease(n.network, self.state_dir, n.mac)
            # Taps vanish with their last fd; macvtap links persist until deleted.
            for n in vmnet.nics:
                remove_link(n.tap.name)
            return
        key = names.vm_key(vm_id)
        for name, link_key in vmdriver_links().items():
            if link_key == key:
                remove_link(name)

    def reconcile(self, known_vm_ids: Sequence[str],
                  keep_networks: Sequence[str] | None = None) -> Reconciled:
        """Remove what a crashed vmdriver left: links and chains of VMs not in
        ``known_vm_ids``; dnsmasq, chains and bridges of networks not in
        ``keep_networks`` (default: the configured ones).
        """
        keys = {names.vm_key(v) for v in known_vm_ids}
        keep = set(self.settings.networks) if keep_networks is None else set(keep_networks)
        done = Reconciled()
        for name, key in vmdriver_links().items():
            if key not in keys and remove_link(name):
                done.links.append(name)
        done.chains = nft.remove_orphans(keys, keep)
        for name in dnsmasq.networks_with_dnsmasq(self.state_dir):
            if name not in keep and dnsmasq.stop_orphan(self.state_dir, name):
                done.dnsmasq.append(name)
        for br, name in bridges.managed_bridges().items():
            if name not in keep and bridges.remove_bridge(br):
                done.bridges.append(br)
        return done


def parse_addresses(values: Sequence[str]) -> list[IPAddress]:
    """Addresses from strings (for callers holding them as text, e.g. saved state)."""
    return [ipaddress.ip_address(v) for v in values]
