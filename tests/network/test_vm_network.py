"""Two real guests on a managed network in namespace A, reached from namespace B and from A.

Everything is real: taps created by vmdriver.network and handed to QEMU as fds,
dnsmasq leases, nftables DNAT/NAT/anti-spoofing in A, curl and UDP sockets in B.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.network import netns
from tests.network.conftest import (
    A_ADDR,
    A_ADDR6,
    B_ADDR,
    SUBNET,
    SUBNET6,
    Topo,
    Vm,
    boot,
    in_subnet,
    wait_ready,
)
from vmdriver.network import GuestAddresses, HostNetwork, ManagedNetwork, NicRequest, PortMap, names, nft
from vmdriver.network.discovery import from_leases, slaac_address
from vmdriver.network.dnsmasq import Dnsmasq, leases_file

pytestmark = pytest.mark.e2e
HOST_PORT = 20080
GUEST_PORT = 8080


def _poll_addresses(hn: HostNetwork, topo: Topo, vm: Vm, want6: bool, **kw: object) -> GuestAddresses:
    deadline = time.monotonic() + 20
    while True:
        with netns.inside(topo.a):
            got = hn.discover(vm.vmnet, 0, **kw)  # type: ignore[arg-type]
        if (got.ipv4 and (got.ipv6 or not want6)) or time.monotonic() > deadline:
            return got
        time.sleep(0.3)


@pytest.fixture(scope="module")
def published(topo: Topo, hostnet: HostNetwork, vms: list[Vm]) -> Iterator[GuestAddresses]:
    """VM 0's port 8080 published on host port 20080 (TCP+UDP, IPv4+IPv6), guards tightened."""
    vm = vms[0]
    addrs = _poll_addresses(hostnet, topo, vm, want6=True, agent=vm.agent.interfaces)
    assert addrs.ipv4 and addrs.ipv6, f"guest addresses not found: {addrs}"
    with netns.inside(topo.a):
        hostnet.publish(vm.vm_id, [PortMap(HOST_PORT, GUEST_PORT)], addrs.addresses)
        for v in vms:
            found = addrs if v is vm else GuestAddresses((ipaddress.IPv4Address(v.ip),))
            hostnet.guard_addresses(v.vmnet, {0: found})
    yield addrs


def _curl(ns: str, url: str) -> str:
    res = netns.in_ns(ns, "curl", "-sS", "-g", "--max-time", "10", url)
    assert res.returncode == 0, f"curl {url} from {ns}: {res.stderr.strip()}"
    return res.stdout


def _udp_echo(ns: str, host: str, port: int = HOST_PORT) -> bytes:
    payload = f"vmdriver-udp-{time.monotonic_ns()}".encode()
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with netns.inside(ns), socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        for _ in range(5):  # UDP: a lost datagram is not a failure of the rules
            s.sendto(payload, (host, port))
            try:
                data, _ = s.recvfrom(2048)
            except TimeoutError:
                continue
            assert data == payload
            return data
    raise AssertionError(f"no UDP echo from {host}:{port} in namespace {ns}")


def test_guests_get_dhcp_leases(topo: Topo, hostnet: HostNetwork, vms: list[Vm]) -> None:
    for vm in vms:
        assert in_subnet(vm.ip, SUBNET), f"{vm.vm_id} got {vm.ip}"
        assert vm.mac.startswith("52:54:00:")
        lease = from_leases(leases_file(topo.state_dir, "default"), vm.mac)
        assert [str(a) for a in lease.ipv4] == [vm.ip]
    assert vms[0].ip != vms[1].ip


def test_discovery_without_agent_uses_leases_and_neighbours(topo: Topo, hostnet: HostNetwork,
                                                             vms: list[Vm]) -> None:
    vm = vms[1]
    got = _poll_addresses(hostnet, topo, vm, want6=True)
    assert got.source == "dhcp-leases"
    assert [str(a) for a in got.ipv4] == [vm.ip]
    # IPv6 from the neighbour table, after poking the SLAAC address the guest formed.
    assert slaac_address(ipaddress.IPv6Network(SUBNET6), vm.mac) in got.ipv6


def test_discovery_prefers_the_guest_agent(published: GuestAddresses, vms: list[Vm]) -> None:
    assert published.source == "agent"
    assert [str(a) for a in published.ipv4] == [vms[0].ip]
    assert slaac_address(ipaddress.IPv6Network(SUBNET6), vms[0].mac) in published.ipv6


def test_published_port_from_another_namespace_tcp(topo: Topo, published: GuestAddresses) -> None:
    assert _curl(topo.b, f"http://{A_ADDR}:{HOST_PORT}/hostname").strip() == "vmdriver-guest"
    assert _curl(topo.b, f"http://[{A_ADDR6}]:{HOST_PORT}/hostname").strip() == "vmdriver-guest"


def test_published_port_from_another_namespace_udp(topo: Topo, published: GuestAddresses) -> None:
    _udp_echo(topo.b, A_ADDR)
    _udp_echo(topo.b, A_ADDR6)


def test_published_port_from_the_host_itself(topo: Topo, published: GuestAddresses) -> None:
    for host in ("127.0.0.1", A_ADDR, f"[{A_ADDR6}]"):
        assert _curl(topo.a, f"http://{host}:{HOST_PORT}/hostname").strip() == "vmdriver-guest"
    for host in ("127.0.0.1", A_ADDR, A_ADDR6):
        _udp_echo(topo.a, host)


def test_only_published_ports_are_forwarded(topo: Topo, published: GuestAddresses,
                                            vms: list[Vm]) -> None:
    res = netns.in_ns(topo.b, "curl", "-sS", "--max-time", "5", f"http://{A_ADDR}:{HOST_PORT + 1}/")
    assert res.returncode != 0
    # The guest subnet is not routable from outside: only DNATed connections get in.
    res = netns.in_ns(topo.b, "ip", "route", "add", SUBNET, "via", A_ADDR)
    try:
        res = netns.in_ns(topo.b, "curl", "-sS", "--max-time", "5", f"http://{vms[0].ip}:{GUEST_PORT}/")
        assert res.returncode != 0, "guest reachable directly, bypassing the published ports"
    finally:
        netns.in_ns(topo.b, "ip", "route", "del", SUBNET)
    with netns.inside(topo.a):
        assert sum(nft.counters("inet", names.vm_chain(vms[0].vm_id, "dnat"))) > 0


def test_two_guests_on_one_bridge_reach_each_other(vms: list[Vm], published: GuestAddresses) -> None:
    code, out = vms[0].agent.run("/bin/busybox", "wget", "-qO-", f"http://{vms[1].ip}:{GUEST_PORT}/hostname")
    assert (code, out.strip()) == (0, "vmdriver-guest")
    code, out = vms[1].agent.run("/bin/busybox", "wget", "-qO-", f"http://{vms[0].ip}:{GUEST_PORT}/hostname")
    assert (code, out.strip()) == (0, "vmdriver-guest")


def test_guest_traffic_out_is_masqueraded(topo: Topo, vms: list[Vm], published: GuestAddresses) -> None:
    peers: list[str] = []
    with netns.inside(topo.b):
        srv = socket.create_server((B_ADDR, 18090))
    srv.settimeout(30)

    def serve() -> None:
        conn, peer = srv.accept()
        with conn:
            peers.append(peer[0])
            conn.recv(1024)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")

    t = threading.Thread(target=serve)
    t.start()
    try:
        code, out = vms[0].agent.run("/bin/busybox", "wget", "-qO-", f"http://{B_ADDR}:18090/")
    finally:
        t.join(35)
        srv.close()
    assert (code, out) == (0, "ok")
    assert peers == [A_ADDR], "guest traffic left without being masqueraded"


def test_spoofed_source_ip_from_a_guest_is_dropped(topo: Topo, vms: list[Vm],
                                                    published: GuestAddresses) -> None:
    vm = vms[1]
    chain = names.vm_chain(vm.vm_id, "spoof")
    with netns.inside(topo.a):
        before = nft.counters("bridge", chain)
    assert vm.agent.run("/bin/busybox", "ping", "-c", "1", "-W", "3", "10.213.0.1")[0] == 0
    assert vm.agent.run("/bin/busybox", "ip", "addr", "add", "10.213.0.250/24", "dev", "eth0")[0] == 0
    try:
        code, _ = vm.agent.run("/bin/busybox", "ping", "-c", "2", "-W", "2", "-I", "10.213.0.250",
                               "10.213.0.1")
    finally:
        vm.agent.run("/bin/busybox", "ip", "addr", "del", "10.213.0.250/24", "dev", "eth0")
    with netns.inside(topo.a):
        after = nft.counters("bridge", chain)
    assert code != 0, "a spoofed source address got an answer"
    # Rules: MAC, ARP MAC, IPv4 source, ARP source IP; the IPv4/ARP ones counted drops.
    assert after[2] + after[3] > before[2] + before[3]


def test_port_bound_to_one_host_address(topo: Topo, hostnet: HostNetwork, vms: list[Vm],
                                        published: GuestAddresses) -> None:
    bound = PortMap(HOST_PORT + 10, GUEST_PORT, ("tcp",), ipaddress.ip_address(A_ADDR))
    with netns.inside(topo.a):
        hostnet.publish(vms[0].vm_id, [PortMap(HOST_PORT, GUEST_PORT), bound], published.addresses)
    assert _curl(topo.b, f"http://{A_ADDR}:{bound.host_port}/hostname").strip() == "vmdriver-guest"
    res = netns.in_ns(topo.a, "curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{bound.host_port}/")
    assert res.returncode != 0, "a port bound to one address answered on another"
    _udp_echo(topo.b, A_ADDR)  # republishing kept the first port


@pytest.fixture(scope="module")
def macvtap_vm(topo: Topo, hostnet: HostNetwork, guest_dir: Path, vms: list[Vm]) -> Iterator[Vm]:
    """A third guest on a macvtap on A's veth: it sits on B's network, leased by a dnsmasq in B."""
    lan_b = ManagedNetwork(name="lan-b", bridge=topo.uplink_b, subnet="10.214.0.0/24", dns=False)
    with netns.inside(topo.b):
        dns = Dnsmasq(lan_b, topo.state_dir)
        dns.start()
    vm = None
    try:
        vm = boot(topo, hostnet, guest_dir, "alloc-m/web",
                  NicRequest(0, "macvtap", device=topo.uplink_a, mode="bridge"))
        wait_ready(vm, time.monotonic() + 150)
        yield vm
    finally:
        if vm is not None and vm.proc.poll() is None:
            vm.proc.kill()
            vm.proc.wait(10)
        with netns.inside(topo.b):
            dns.stop()


def test_guest_on_macvtap_joins_the_device_network(topo: Topo, hostnet: HostNetwork,
                                                   macvtap_vm: Vm) -> None:
    vm = macvtap_vm
    assert in_subnet(vm.ip, "10.214.0.0/24"), f"no lease from B's dnsmasq: {vm.ip}"
    assert _curl(topo.b, f"http://{vm.ip}:{GUEST_PORT}/hostname").strip() == "vmdriver-guest"
    _udp_echo(topo.b, vm.ip, GUEST_PORT)
    link = vm.vmnet.nics[0].tap.name
    vm.proc.kill()
    vm.proc.wait(10)
    assert link in netns.ip("-o", "link", ns=topo.a), "macvtap links outlive QEMU: detach must remove them"
    with netns.inside(topo.a):
        hostnet.detach(vm.vm_id, vm.vmnet)
    assert link not in netns.ip("-o", "link", ns=topo.a)


def test_stop_removes_tap_and_chains(topo: Topo, hostnet: HostNetwork, vms: list[Vm],
                                     published: GuestAddresses) -> None:
    vm = vms[1]
    tap = vm.vmnet.nics[0].tap.name
    assert tap in netns.ip("-o", "link", ns=topo.a)
    vm.proc.kill()  # QEMU crashing: the tap goes with its last fd, before any cleanup
    vm.proc.wait(10)
    assert tap not in netns.ip("-o", "link", ns=topo.a)
    leases = leases_file(topo.state_dir, "default")
    assert vm.mac in leases.read_text()
    with netns.inside(topo.a):
        hostnet.detach(vm.vm_id, vm.vmnet)
        chains = [c for _, c in nft.chains()]
    deadline = time.monotonic() + 5  # dnsmasq rewrites the file after the DHCPRELEASE
    while vm.mac in leases.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vm.mac not in leases.read_text(), "the stopped VM's lease was not released"
    assert vms[0].mac in leases.read_text()
    key = names.vm_key(vm.vm_id)
    assert not [c for c in chains if key in c]
    assert names.vm_chain(vms[0].vm_id, "dnat") in chains, "another VM's rules went too"
