"""Managed networks' bridges: created with their gateway addresses over netlink.

A managed bridge gets a fixed MAC (otherwise it takes its lowest port's, which
changes as VMs come and go), the subnet's first address, and the /64's ``::1``
when IPv6 is on (without duplicate address detection, so dnsmasq can bind it
at once). Forwarding is switched on, as libvirt does for NAT networks.
"""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from vmdriver.errors import HostError
from vmdriver.network import names
from vmdriver.network.config import ManagedNetwork
from vmdriver.network.tap import ipr

IFA_F_NODAD = 0x02
#: The alias marking a bridge as a managed network's (and naming the network).
ALIAS_PREFIX = "vmdriver network "


def sysctl(key: str, value: str) -> None:
    """Write a sysctl of the calling thread's network namespace (``net.ipv4.ip_forward``)."""
    path = Path("/proc/sys") / key.replace(".", "/")
    try:
        if path.read_text().strip() != value:
            path.write_text(value)
    except OSError as exc:
        raise HostError(f"cannot set {key}={value}: {exc.strerror}") from None


def ensure_bridge(net: ManagedNetwork) -> int:
    """Create (or complete) the network's bridge; returns its ifindex. Idempotent."""
    with ipr() as sock:
        found = sock.link_lookup(ifname=net.bridge)
        if not found:
            try:
                sock.link("add", ifname=net.bridge, kind="bridge", br_stp_state=0,
                          br_forward_delay=0, address=names.bridge_mac(net.bridge))
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise HostError(f"cannot create bridge {net.bridge}: {exc}") from None
            found = sock.link_lookup(ifname=net.bridge)
        else:
            _check_ours(sock, found[0], net)
        index = int(found[0])
        sock.link("set", index=index, ifalias=f"{ALIAS_PREFIX}{net.name}")
        _ensure_addr(sock, index, str(net.gateway.ip), net.gateway.network.prefixlen, 0)
        if net.gateway6 is not None:
            _ensure_addr(sock, index, str(net.gateway6.ip), 64, IFA_F_NODAD)
        sock.link("set", index=index, state="up")
    sysctl("net.ipv4.ip_forward", "1")
    # The host's own connections to 127.0.0.1:port are DNATed to the guest and
    # leave through the bridge: without this the kernel drops them as martians.
    sysctl(f"net.ipv4.conf.{net.bridge}.route_localnet", "1")
    if net.ipv6_subnet is not None:
        sysctl("net.ipv6.conf.all.forwarding", "1")
    return index


def _check_ours(sock: Any, index: int, net: ManagedNetwork) -> None:
    """Refuse to take over a bridge someone else made (a LAN bridge of the same name)."""
    alias = sock.get_links(index)[0].get_attr("IFLA_IFALIAS") or ""
    if alias != f"{ALIAS_PREFIX}{net.name}":
        raise HostError(f"network {net.name}: {net.bridge} already exists and is not vmdriver's "
                        f"(alias {alias!r}); name another bridge, or list it in allowed_bridges "
                        "to attach VMs to it as is")


def _ensure_addr(sock: object, index: int, address: str, prefixlen: int, flags: int) -> None:
    try:
        sock.addr("add", index=index, address=address, prefixlen=prefixlen,  # type: ignore[attr-defined]
                  flags=flags)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise HostError(f"cannot add {address}/{prefixlen}: {exc}") from None


def remove_bridge(bridge: str) -> bool:
    """Delete a managed bridge (its taps fall off it); False if it was gone."""
    with ipr() as sock:
        found = sock.link_lookup(ifname=bridge)
        if not found:
            return False
        with contextlib.suppress(NetlinkError):
            sock.link("del", index=found[0])
    return True


def managed_bridges() -> dict[str, str]:
    """Bridges vmdriver created in this namespace (by their alias): bridge → network name."""
    out = {}
    prefix = ALIAS_PREFIX
    with ipr() as sock:
        for link in sock.get_links():
            alias = link.get_attr("IFLA_IFALIAS") or ""
            if alias.startswith(prefix):
                out[link.get_attr("IFLA_IFNAME")] = alias[len(prefix):]
    return out
