"""Pure logic of the wiring: which addresses are learned, what Nomad is told."""

from __future__ import annotations

import asyncio
import ipaddress
import time

from vmdriver.network.discovery import GuestAddresses
from vmdriver.network.manager import VmNetwork
from vmdriver.nomad.netoverride import advertised, has_own_address, port_map
from vmdriver.runtime.networking import VmLinks, learn
from vmdriver.spec import MacvtapNic, PortForward, TapNic, UserNic, VMSpec

V4 = ipaddress.IPv4Address("10.213.0.7")
V4B = ipaddress.IPv4Address("10.213.0.99")
V6 = ipaddress.IPv6Address("fd00:213::7")


def addrs(*items: ipaddress.IPv4Address | ipaddress.IPv6Address, source: str = "agent"
          ) -> GuestAddresses:
    v4 = tuple(a for a in items if isinstance(a, ipaddress.IPv4Address))
    v6 = tuple(a for a in items if isinstance(a, ipaddress.IPv6Address))
    return GuestAddresses(v4, v6, source, items)


def test_first_addresses_are_learned() -> None:
    got = learn(GuestAddresses(), addrs(V4, source="dhcp-leases"))
    assert got is not None and got.addresses == (V4,) and got.source == "dhcp-leases"


def test_nothing_found_or_nothing_new_changes_nothing() -> None:
    assert learn(addrs(V4), GuestAddresses()) is None
    assert learn(addrs(V4), addrs(V4)) is None


def test_a_family_is_locked_once_learned() -> None:
    # The guest claims another IPv4 address later (agent or ARP): not taken.
    assert learn(addrs(V4), addrs(V4B)) is None
    assert learn(addrs(V4), addrs(V4, V4B)) is None


def test_a_new_family_is_added() -> None:
    got = learn(addrs(V4, source="dhcp-leases"), addrs(V4B, V6))
    assert got is not None and got.addresses == (V4, V6)


def test_nomad_gets_the_ipv4_address_and_guest_ports() -> None:
    assert advertised(("fd00::1", "10.0.0.2")) == "10.0.0.2"
    assert advertised(("fd00::1",)) == "fd00::1"
    spec = VMSpec(name="v", nics=(
        TapNic(id="net0", bridge="br0", forwards=(
            PortForward(label="http", host_port=20080, guest_port=8080),
            PortForward(label="dns", host_port=20053, guest_port=53))),
        MacvtapNic(id="net1", device="eth1")))
    assert port_map(spec) == {"http": 8080, "dns": 53}
    assert has_own_address(spec)
    assert not has_own_address(VMSpec(name="u", nics=(UserNic(id="net0"),)))


def test_waiting_for_an_address_ends_when_found_or_when_the_vm_is_gone() -> None:
    async def go() -> tuple[float, GuestAddresses, GuestAddresses]:
        gone = VmLinks(VmNetwork("gone"))
        gone.watcher = asyncio.create_task(asyncio.sleep(60))  # the VM's watcher: ends with it
        asyncio.get_running_loop().call_later(0.1, gone.watcher.cancel)
        t0 = time.monotonic()
        none = await gone.wait(30)
        took = time.monotonic() - t0
        up = VmLinks(VmNetwork("up"))
        up.watcher = asyncio.create_task(asyncio.sleep(60))
        asyncio.get_running_loop().call_later(0.1, up.update, addrs(V4))
        found = await up.wait(30)
        up.watcher.cancel()
        return took, none, found

    took, none, found = asyncio.run(go())
    assert took < 5 and not none
    assert found.addresses == (V4,)
