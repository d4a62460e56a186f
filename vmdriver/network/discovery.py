"""Which addresses a guest has: from its agent, the DHCP leases, or the neighbour table.

Sources in order of trust: the guest agent (``guest-network-get-interfaces``
knows static and IPv6 addresses too), then dnsmasq's leases of a managed
network, then the kernel's neighbour table by MAC (works on any bridge, for
guests that have sent something). Each call is a single cheap look-up; the
caller polls (the core waits up to its bound, then starts without an address).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from vmdriver.network.tap import ipr

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: What the core passes: a callable returning the agent's ``guest-network-get-interfaces``
#: result (a list of interfaces), or raising / returning None when the agent is not up.
AgentInterfaces = Callable[[], Sequence[Mapping[str, Any]] | None]
# NUD_INCOMPLETE | NUD_FAILED: entries that were never (or no longer) answered.
_NUD_UNUSABLE = 0x01 | 0x20


@dataclass(frozen=True)
class GuestAddresses:
    """A guest NIC's usable addresses and where they came from."""

    ipv4: tuple[ipaddress.IPv4Address, ...] = ()
    ipv6: tuple[ipaddress.IPv6Address, ...] = ()
    source: str = ""
    all: tuple[IPAddress, ...] = field(default=(), repr=False)

    def __bool__(self) -> bool:
        return bool(self.ipv4 or self.ipv6)

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        return (*self.ipv4, *self.ipv6)


def _usable(addr: IPAddress) -> bool:
    """Addresses a port can be published on: not loopback, link-local or unspecified."""
    return not (addr.is_loopback or addr.is_link_local or addr.is_unspecified or addr.is_multicast)


def _group(addrs: Iterable[IPAddress], source: str) -> GuestAddresses:
    seen: list[IPAddress] = []
    for a in addrs:
        if _usable(a) and a not in seen:
            seen.append(a)
    v4 = tuple(a for a in seen if isinstance(a, ipaddress.IPv4Address))
    v6 = tuple(a for a in seen if isinstance(a, ipaddress.IPv6Address))
    return GuestAddresses(v4, v6, source if seen else "", tuple(seen))


def from_agent(interfaces: Sequence[Mapping[str, Any]] | None, mac: str) -> GuestAddresses:
    """Addresses of the guest interface with this MAC in a ``guest-network-get-interfaces`` reply."""
    found: list[IPAddress] = []
    for iface in interfaces or ():
        if str(iface.get("hardware-address", "")).lower() != mac.lower():
            continue
        for ip in iface.get("ip-addresses") or ():
            with contextlib.suppress(ValueError, TypeError):
                found.append(ipaddress.ip_address(str(ip.get("ip-address", "")).split("%")[0]))
    return _group(found, "agent")


def from_leases(path: Path, mac: str) -> GuestAddresses:
    """The newest IPv4 lease of this MAC in a dnsmasq leases file.

    Lines are ``expiry mac ip hostname client-id``; dnsmasq rewrites the file on
    every change, so an old lease of a reused MAC is replaced, not appended.
    """
    best: tuple[int, ipaddress.IPv4Address] | None = None
    try:
        text = path.read_text()
    except OSError:
        return GuestAddresses()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[1].lower() != mac.lower():
            continue
        with contextlib.suppress(ValueError):
            expiry, addr = int(parts[0]), ipaddress.ip_address(parts[2])
            if isinstance(addr, ipaddress.IPv4Address) and (best is None or expiry >= best[0]):
                best = (expiry, addr)
    return _group([best[1]] if best else [], "dhcp-leases")


def from_neighbours(mac: str, ifname: str | None = None) -> GuestAddresses:
    """Addresses the kernel's neighbour table (ARP/NDP) has for this MAC."""
    found: list[IPAddress] = []
    with ipr() as sock:
        index = None
        if ifname:
            links = sock.link_lookup(ifname=ifname)
            if not links:
                return GuestAddresses()
            index = links[0]
        try:
            entries = sock.get_neighbours(ifindex=index) if index else sock.get_neighbours()
        except NetlinkError:
            return GuestAddresses()
        for n in entries:
            if str(n.get_attr("NDA_LLADDR") or "").lower() != mac.lower() or n["state"] & _NUD_UNUSABLE:
                continue
            with contextlib.suppress(ValueError):
                found.append(ipaddress.ip_address(n.get_attr("NDA_DST")))
    return _group(found, "neighbours")


def slaac_address(prefix: ipaddress.IPv6Network, mac: str) -> ipaddress.IPv6Address:
    """The EUI-64 address a guest with this MAC forms in a /64 (Linux's default)."""
    octets = [int(b, 16) for b in mac.split(":")]
    eui = [octets[0] ^ 0x02, *octets[1:3], 0xFF, 0xFE, *octets[3:6]]
    return prefix.network_address + int.from_bytes(bytes(eui), "big")


def poke(addr: IPAddress, port: int = 9) -> None:
    """Send one UDP datagram (to the discard port) so the kernel resolves the neighbour.

    The guest's reply to neighbour solicitation puts its address in the
    neighbour table, confirming an address (such as a SLAAC guess) exists.
    """
    fam = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    with contextlib.suppress(OSError), socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.sendto(b"", (str(addr), port))


def discover(mac: str, *, agent: AgentInterfaces | None = None, leases: Path | None = None,
             bridge: str | None = None, ipv6_prefix: ipaddress.IPv6Network | None = None
             ) -> GuestAddresses:
    """One look-up of a guest NIC's addresses: agent, else leases, else neighbours.

    The leases and neighbour table only know IPv4 leases and addresses the guest
    used; with ``ipv6_prefix`` (a managed network's /64) the SLAAC address is
    poked and, once the guest answered, found in the neighbour table. An agent
    that is not up (raises or returns None) counts as no answer.
    """
    if agent is not None:
        try:
            got = from_agent(agent(), mac)
        except Exception:
            got = GuestAddresses()
        if got:
            return got
    if ipv6_prefix is not None:
        poke(slaac_address(ipv6_prefix, mac))
    neigh = from_neighbours(mac, bridge)
    if leases is not None:
        lease = from_leases(leases, mac)
        if lease:
            return GuestAddresses(lease.ipv4, neigh.ipv6, "dhcp-leases",
                                  (*lease.ipv4, *neigh.ipv6))
    return neigh
