"""vmdriver's nftables rules, through libnftables' JSON API (no ``nft`` processes).

Everything lives in two tables vmdriver owns, ``inet vmdriver`` and ``bridge
vmdriver``; nothing else on the host is touched. Each VM has its own chains
(``vm-<key>-dnat`` on prerouting, ``vm-<key>-local`` on output, ``vm-<key>-spoof``
on the bridge's prerouting), each network its own (``net-<name>-nat``,
``net-<name>-fwd``). Chains are base chains, so removing a VM is deleting its
chains, in one transaction: no jump rules to find, and a crash leaves only
whole chains, which :func:`remove_orphans` finds by name. NAT chains see only
the first packet of a connection, so many of them cost little per packet.

Every change is one libnftables batch, which the kernel applies atomically.
"""

from __future__ import annotations

import ipaddress
import json
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import nftables  # type: ignore[import-untyped]

from vmdriver.errors import HostError
from vmdriver.network import names
from vmdriver.network.config import ManagedNetwork

INET = "inet"
BRIDGE = "bridge"
NETDEV = "netdev"
#: Priorities: dstnat (-100), srcnat (100), filter (0); the bridge guard runs
#: before anything else sees the frame.
_DSTNAT, _SRCNAT, _FILTER, _BRIDGE_FIRST = -100, 100, 0, -300
Json = dict[str, Any]


@dataclass(frozen=True)
class PortMap:
    """One published port: host port → guest port, for the listed protocols."""

    host_port: int
    guest_port: int
    protocols: tuple[str, ...] = ("tcp", "udp")
    #: Only traffic to this host address (Nomad's port's host IP); None: any local address.
    host_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None


_local = threading.local()


def _context() -> Any:
    """This thread's libnftables context for its current network namespace.

    Contexts are reused: freeing one closes its netlink socket, which waits for
    an RCU grace period (~10 ms here), more than the batch itself takes. They
    are not thread-safe, and a socket stays in the namespace it was opened in,
    hence one per thread and namespace.
    """
    netns = os.stat("/proc/thread-self/ns/net").st_ino
    cache: dict[int, Any] = _local.__dict__.setdefault("contexts", {})
    ctx = cache.get(netns)
    if ctx is None:
        ctx = cache[netns] = nftables.Nftables()
        ctx.set_json_output(True)
    return ctx


def run(commands: Sequence[Json]) -> Json:
    """Run one batch; HostError with libnftables' message if the kernel refuses it."""
    rc, out, err = _context().json_cmd({"nftables": list(commands)})
    if rc != 0:
        raise HostError(f"nftables: {str(err).strip() or 'error ' + str(rc)}")
    if isinstance(out, dict):
        return out
    return json.loads(out) if out else {}


# --- expression helpers -------------------------------------------------------------

def _match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _payload(protocol: str, fld: str) -> Json:
    return {"payload": {"protocol": protocol, "field": fld}}


def _set(items: Iterable[Any]) -> Json:
    return {"set": list(items)}


def _prefix(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Json:
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _table(family: str) -> Json:
    return {"add": {"table": {"family": family, "name": names.TABLE}}}


def _chain(family: str, name: str, kind: str, hook: str, prio: int, dev: str = "") -> list[Json]:
    ref = {"family": family, "table": names.TABLE, "name": name}
    spec = {**ref, "type": kind, "hook": hook, "prio": prio, "policy": "accept"}
    if dev:
        spec["dev"] = dev
    return [{"add": {"chain": spec}}, {"flush": {"chain": ref}}]


def _rule(family: str, chain: str, *expr: Json) -> Json:
    return {"add": {"rule": {"family": family, "table": names.TABLE, "chain": chain, "expr": list(expr)}}}


def _loopback_snat() -> list[Json]:
    """Masquerade DNATed connections the host opened from 127.0.0.0/8 (needs route_localnet)."""
    chain = "localhost-snat"
    return [*_chain(INET, chain, "nat", "postrouting", _SRCNAT),
            _rule(INET, chain, _match({"ct": {"key": "status"}}, "dnat", "in"),
                  _match(_payload("ip", "saddr"), _prefix(ipaddress.IPv4Network("127.0.0.0/8"))),
                  {"masquerade": None})]


def base() -> list[Json]:
    """Commands creating vmdriver's tables and shared chains (idempotent)."""
    return [_table(INET), _table(BRIDGE), _table(NETDEV), *_loopback_snat()]


# --- published ports -------------------------------------------------------------------

def _dnat_rules(chain: str, ports: Sequence[PortMap],
                addrs: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
                host_ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> list[Json]:
    rules = []
    for addr in addrs:
        fam = "ip" if addr.version == 4 else "ip6"
        for p in ports:
            bound = [p.host_ip] if p.host_ip is not None else list(host_ips)
            mine = [a for a in bound if a.version == addr.version]
            if bound and not mine:
                continue  # the host address Nomad gave is of the other family
            dest = (_match(_payload(fam, "daddr"), _set(map(str, mine))) if mine
                    else _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"))
            for proto in p.protocols:
                rules.append(_rule(
                    INET, chain, _match(_meta("nfproto"), "ipv4" if fam == "ip" else "ipv6"), dest,
                    _match(_payload(proto, "dport"), p.host_port), {"counter": None},
                    {"dnat": {"family": fam, "addr": str(addr), "port": p.guest_port}}))
    return rules


def publish(vm_id: str, ports: Sequence[PortMap],
            addrs: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
            host_ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address] = ()) -> None:
    """Forward host ports to the guest's addresses (replacing the VM's previous rules).

    Traffic from other hosts is DNATed at prerouting, traffic the host itself
    sends at output; by default on every local address (``fib daddr type
    local``, as Nomad's CNI portmap does), or only on the port's ``host_ip``
    (else ``host_ips``). Call again
    when the guest's addresses change: the batch flushes and refills the chains.
    """
    for p in ports:
        for proto in p.protocols:
            if proto not in ("tcp", "udp"):
                raise ValueError(f"protocol {proto!r}: only tcp and udp can be published")
    dnat, local = names.vm_chain(vm_id, "dnat"), names.vm_chain(vm_id, "local")
    run([*base(),
         *_chain(INET, dnat, "nat", "prerouting", _DSTNAT),
         *_chain(INET, local, "nat", "output", _DSTNAT),
         *_dnat_rules(dnat, ports, addrs, host_ips),
         *_dnat_rules(local, ports, addrs, host_ips)])


# --- anti-spoofing ---------------------------------------------------------------------

@dataclass(frozen=True)
class Guard:
    """What a VM's NIC may send: its MAC and, once known, its addresses."""

    tap: str
    mac: str
    ipv4: tuple[ipaddress.IPv4Address, ...] = ()
    ipv6: tuple[ipaddress.IPv6Address, ...] = ()


def _guard_rules(family: str, chain: str, g: Guard) -> list[Json]:
    # A bridge chain sees every port: match the tap. A netdev chain is the device's own.
    iif = [_match(_meta("iifname"), g.tap)] if family == BRIDGE else []
    drop = ({"counter": None}, {"drop": None})
    etype = _payload("ether", "type")
    rules = [_rule(family, chain, *iif, _match(_payload("ether", "saddr"), g.mac, "!="), *drop),
             _rule(family, chain, *iif, _match(etype, "arp"),
                   _match(_payload("arp", "saddr ether"), g.mac, "!="), *drop)]
    if g.ipv4:
        # 0.0.0.0: DHCP discover/request and ARP probes before the address is bound.
        ok4 = _set([*map(str, g.ipv4), "0.0.0.0"])
        rules += [_rule(family, chain, *iif, _match(etype, "ip"),
                        _match(_payload("ip", "saddr"), ok4, "!="), *drop),
                  _rule(family, chain, *iif, _match(etype, "arp"),
                        _match(_payload("arp", "saddr ip"), ok4, "!="), *drop)]
    if g.ipv6:
        # ::, link-local: duplicate address detection, router solicitations.
        ok6 = _set([*map(str, g.ipv6), "::", _prefix(ipaddress.IPv6Network("fe80::/10"))])
        rules.append(_rule(family, chain, *iif, _match(etype, "ip6"),
                           _match(_payload("ip6", "saddr"), ok6, "!="), *drop))
    return rules


def guard(vm_id: str, guards: Sequence[Guard]) -> None:
    """Drop frames from the VM's taps not from its MAC (or, once known, its IPs)."""
    chain = names.vm_chain(vm_id, "spoof")
    rules = [r for g in guards for r in _guard_rules(BRIDGE, chain, g)]
    run([*base(), *_chain(BRIDGE, chain, "filter", "prerouting", _BRIDGE_FIRST), *rules])


def guard_macvtap(vm_id: str, index: int, g: Guard) -> None:
    """The same for a macvtap: a netdev chain on the link's egress, which sees what the
    guest writes into its fd before it reaches the host device (kernel >= 5.16)."""
    chain = names.vm_chain(vm_id, f"mv{index:x}")
    try:
        run([*base(), *_chain(NETDEV, chain, "filter", "egress", _FILTER, dev=g.tap),
             *_guard_rules(NETDEV, chain, g)])
    except HostError as exc:
        raise HostError(f"macvtap {g.tap}: anti-spoofing needs netfilter's egress hook "
                        f"(Linux 5.16 or later): {exc}") from None


# --- managed networks -----------------------------------------------------------------

def network_rules(net: ManagedNetwork) -> None:
    """NAT and forwarding for a managed network, like libvirt's ``<forward mode='nat'>``.

    Outbound: masquerade the subnet to anything outside it. Inbound: only replies
    and DNATed (published) connections reach the bridge; the subnet is not
    routable from outside. Hairpin: a guest reaching a published port of a guest
    on the same bridge through the host address is masqueraded, so the reply
    comes back through the host's conntrack.
    """
    nat, fwd = names.net_chain(net.name, "nat"), names.net_chain(net.name, "fwd")
    br, status = net.bridge, {"ct": {"key": "status"}}
    cmds = [*base(), *_chain(INET, nat, "nat", "postrouting", _SRCNAT),
            *_chain(INET, fwd, "filter", "forward", _FILTER)]
    subnets: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]] = [("ip", net.subnet)]
    if net.ipv6_subnet is not None:
        subnets.append(("ip6", net.ipv6_subnet))
    for fam, sub in subnets:
        cmds.append(_rule(INET, nat, _match(_meta("oifname"), br), _match(status, "dnat", "in"),
                          _match(_payload(fam, "saddr"), _prefix(sub)), {"masquerade": None}))
        if net.nat:
            cmds.append(_rule(INET, nat, _match(_payload(fam, "saddr"), _prefix(sub)),
                              _match(_payload(fam, "daddr"), _prefix(sub), "!="), {"masquerade": None}))
    cmds += [
        _rule(INET, fwd, _match(_meta("oifname"), br),
              _match({"ct": {"key": "state"}}, ["established", "related"], "in"), {"accept": None}),
        _rule(INET, fwd, _match(_meta("oifname"), br), _match(status, "dnat", "in"), {"accept": None}),
        _rule(INET, fwd, _match(_meta("iifname"), br), {"accept": None}),
        _rule(INET, fwd, _match(_meta("oifname"), br), {"counter": None}, {"drop": None}),
    ]
    run(cmds)


# --- listing and removal ------------------------------------------------------------------

def chains() -> list[tuple[str, str]]:
    """(family, name) of every chain in vmdriver's tables."""
    out = run([{"list": {"chains": {}}}])
    found = []
    for item in out.get("nftables", ()):
        c = item.get("chain")
        if c and c.get("table") == names.TABLE and c.get("family") in (INET, BRIDGE, NETDEV):
            found.append((c["family"], c["name"]))
    return found


def delete_chains(targets: Iterable[tuple[str, str]]) -> list[str]:
    """Delete chains in one transaction; returns their names.

    Two supervisors may tear the same VM down at once (`vmdriver stop` re-attached
    while `vmdriver run` sees QEMU exit): a chain gone in between fails the whole
    batch, so it is retried with the chains that still exist.
    """
    targets = list(targets)
    for attempt in range(3):
        if not targets:
            return []
        try:
            run([{"delete": {"chain": {"family": f, "table": names.TABLE, "name": n}}}
                 for f, n in targets])
            break
        except HostError:
            if attempt == 2:
                raise
            existing = set(chains())
            targets = [t for t in targets if t in existing]
    return [n for _, n in targets]


def remove_vm(vm_id: str) -> list[str]:
    """Delete every chain of a VM (ports and anti-spoofing) at once."""
    prefix = f"{names.VM_CHAIN_PREFIX}{names.vm_key(vm_id)}-"
    return delete_chains(c for c in chains() if c[1].startswith(prefix))


def remove_network(name: str) -> list[str]:
    """Delete a managed network's chains."""
    prefix = f"{names.NET_CHAIN_PREFIX}{name}-"
    return delete_chains(c for c in chains() if c[1].startswith(prefix))


def remove_orphans(known_keys: set[str], keep_networks: set[str]) -> list[str]:
    """Delete chains of VMs not in ``known_keys`` and networks not in ``keep_networks``."""
    orphans = []
    for fam, name in chains():
        key = names.chain_key(name)
        if key is not None and key not in known_keys:
            orphans.append((fam, name))
        elif name.startswith(names.NET_CHAIN_PREFIX):
            net = name[len(names.NET_CHAIN_PREFIX):].rsplit("-", 1)[0]
            if net not in keep_networks:
                orphans.append((fam, name))
    return delete_chains(orphans)


def counters(family: str, chain: str) -> list[int]:
    """Packet counts of the counters in a chain, in rule order (for tests and `ps`)."""
    out = run([{"list": {"chain": {"family": family, "table": names.TABLE, "name": chain}}}])
    packets = []
    for item in out.get("nftables", ()):
        for expr in item.get("rule", {}).get("expr", ()):
            if isinstance(expr, dict) and isinstance(expr.get("counter"), dict):
                packets.append(int(expr["counter"]["packets"]))
    return packets
