"""Issue 13 end to end through vmdriver's supervisor, with real guests, in namespaces.

Topology (all inside namespaces this module creates)::

    B: vB 10.214.0.2 ── veth ── A: vA 10.214.0.1 ── macvtap ── QEMU mv (guest agent)
       dnsmasq for 10.214.0.100-150             A: vmdbr0 10.213.0.1/24 (managed: dnsmasq, NAT)
                                                   tap ── QEMU web  (8080 published as 20080)
                                                   tap ── QEMU peer

The supervisor runs in a process inside A (tests/netvm/server.py); it creates
the managed bridge, its dnsmasq, the taps, the macvtap and the nftables rules.
Three TCG boots serve every test; the tests run in file order, as the last
ones crash a guest's QEMU and kill the supervisor.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import READY
from tests.netvm.conftest import (
    BRIDGE,
    SUBNET,
    alive,
    chains_of,
    cleanup,
    dnsmasq_pid,
    host_config,
    links_of,
    state_tmp,
)
from tests.netvm.harness import Served
from tests.network import netns
from vmdriver.network import names, nft
from vmdriver.runtime.console import wait_for_line

A_ADDR, B_ADDR, LAN = "10.214.0.1", "10.214.0.2", "10.214.0.0/24"
A_ADDR6, B_ADDR6, SUBNET6 = "fd00:214::1", "fd00:214::2", "fd00:213::/64"
HOST_PORT, GUEST_PORT = 20080, 8080
WEB, PEER, MV = "n1/web", "n2/peer", "n3/mv"
BOOT_S = 240.0
PAGE = "vmdriver-test-guest"


@dataclass
class Env:
    a: str
    b: str
    state: Path
    config: dict[str, object]
    served: Served
    pids: dict[str, int]
    addrs: dict[str, str]


def _b_dnsmasq(b: str, state: Path) -> subprocess.Popen[bytes]:
    """A DHCP server on B's side of the veth, for the guest on the macvtap."""
    return subprocess.Popen(
        ["ip", "netns", "exec", b, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
         "--bind-interfaces", "--interface=vB", "--port=0", "--no-ping",
         "--dhcp-range=10.214.0.100,10.214.0.150,255.255.255.0,1h",
         f"--dhcp-leasefile={state / 'b.leases'}", f"--pid-file={state / 'b.pid'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _nic(kind: str, **extra: object) -> dict[str, object]:
    return {"kind": kind, "id": "net0", **extra}


@pytest.fixture(scope="module")
def env(guest_dir: Path) -> Iterator[Env]:
    a, b, state = netns.unique("vmdga"), netns.unique("vmdgb"), state_tmp()
    dns = None
    try:
        netns.create(a)
        netns.create(b)
        netns.veth(a, "vA", b, "vB")
        netns.ip("addr", "add", f"{A_ADDR}/24", "dev", "vA", ns=a)
        netns.ip("addr", "add", f"{B_ADDR}/24", "dev", "vB", ns=b)
        netns.ip("addr", "add", f"{A_ADDR6}/64", "dev", "vA", "nodad", ns=a)
        netns.ip("addr", "add", f"{B_ADDR6}/64", "dev", "vB", "nodad", ns=b)
        dns = _b_dnsmasq(b, state)
        config = host_config(state, guest_dir, ipv6=SUBNET6, allowed_devices=["vA"])
        served = Served(a, config, state / "server1.log")
        web = _nic("tap", bridge=BRIDGE, forwards=[
            {"label": "http", "host_port": HOST_PORT, "guest_port": GUEST_PORT}])
        started = served.call("start", timeout=120, vms=[
            {"id": WEB, "nics": [web], "boot": True, "agent": True},
            {"id": PEER, "nics": [_nic("tap", bridge=BRIDGE)], "boot": True, "agent": True},
            {"id": MV, "nics": [_nic("macvtap", device="vA")], "boot": True, "agent": True}])
        pids = {vm["id"]: vm["pid"] for vm in started["vms"]}
        for vm in started["vms"]:
            # The lease comes before the guest's services: the UDP echo binds last.
            asyncio.run(wait_for_line(Path(vm["stdout"]), READY, BOOT_S))
        addrs = {}
        for vm_id in (WEB, PEER, MV):
            got = served.call("addresses", timeout=BOOT_S + 10, id=vm_id, wait=BOOT_S)
            assert got["addresses"], f"{vm_id}: no address in {BOOT_S}s; {served.tail()}"
            addrs[vm_id] = got["addresses"][0]
        yield Env(a, b, state, config, served, pids, addrs)
        if served.proc.poll() is None:
            served.close()
    finally:
        if dns is not None:
            dns.kill()
            dns.wait(10)
        cleanup([b, a], state)


def _in(net: str, addr: str) -> bool:
    return ipaddress.ip_address(addr) in ipaddress.ip_network(net)


def _udp_echo(ns: str, host: str, port: int) -> str:
    fam = "AF_INET6" if ":" in host else "AF_INET"
    code = (f"import socket,sys; s=socket.socket(socket.{fam},socket.SOCK_DGRAM); "
            "s.settimeout(15); "
            "[s.sendto(b'ping-vmdriver',(sys.argv[1],int(sys.argv[2]))) for _ in range(3)]; "
            "print(s.recvfrom(100)[0].decode())")
    return netns.in_ns(ns, sys.executable, "-c", code, host, str(port)).stdout.strip()


def _curl(ns: str, url: str) -> str:
    return netns.in_ns(ns, "curl", "-s", "--max-time", "10", url).stdout


def test_guest_gets_a_dhcp_lease_shown_by_ps(env: Env) -> None:
    addr = env.addrs[WEB]
    assert _in(SUBNET, addr) and _in(SUBNET, env.addrs[PEER])
    leases = (env.state / "net" / "network" / "default" / "dnsmasq.leases").read_text()
    assert any(line.split()[2] == addr for line in leases.splitlines()), leases
    vmdriver = str(Path(sys.executable).with_name("vmdriver"))
    ps = subprocess.run([vmdriver, "ps", "--json", "--state-dir", str(env.state)], check=True,
                        capture_output=True, text=True)
    rows = {r["id"]: r for r in json.loads(ps.stdout)}
    assert rows[WEB]["addresses"][0] == addr
    assert rows[MV]["addresses"][0] == env.addrs[MV]


def test_published_port_from_the_lan_and_the_host_tcp_and_udp(env: Env) -> None:
    for ns, host in ((env.b, A_ADDR), (env.a, A_ADDR), (env.a, "127.0.0.1")):
        assert PAGE in _curl(ns, f"http://{host}:{HOST_PORT}/"), (ns, host)
        assert _udp_echo(ns, host, HOST_PORT) == "ping-vmdriver", (ns, host)
    # Only the published port: the managed subnet itself is not routable from B.
    netns.ip("route", "add", SUBNET, "via", A_ADDR, ns=env.b)
    assert PAGE not in _curl(env.b, f"http://{env.addrs[WEB]}:{GUEST_PORT}/")


def test_published_port_over_ipv6_once_the_guest_has_an_address(env: Env) -> None:
    """The guest's SLAAC address comes after its DHCP lease: learned, then published too."""
    deadline = time.monotonic() + 90
    v6: list[str] = []
    while not v6 and time.monotonic() < deadline:
        got = env.served.call("addresses", id=WEB, wait=0)["addresses"]
        v6 = [a for a in got if _in(SUBNET6, a)]
        time.sleep(1)
    assert v6, f"no IPv6 address learned for {WEB}"
    assert PAGE in _curl(env.b, f"http://[{A_ADDR6}]:{HOST_PORT}/")
    assert _udp_echo(env.b, A_ADDR6, HOST_PORT) == "ping-vmdriver"


def test_guests_on_one_bridge_reach_each_other(env: Env) -> None:
    got = env.served.call("exec", id=WEB, argv=[
        "/bin/busybox", "wget", "-qO-", f"http://{env.addrs[PEER]}:8080/hostname"])
    assert got["code"] == 0 and "vmdriver-guest" in got["output"], got


def test_macvtap_guest_reached_from_the_other_namespace(env: Env) -> None:
    addr = env.addrs[MV]
    assert _in(LAN, addr) and addr not in (A_ADDR, B_ADDR)
    (link,) = links_of(env.a, MV)
    assert link.startswith(names.MACVTAP_PREFIX)
    assert PAGE in _curl(env.b, f"http://{addr}:{GUEST_PORT}/")
    assert _udp_echo(env.b, addr, GUEST_PORT) == "ping-vmdriver"


def test_spoofed_source_mac_is_dropped(env: Env) -> None:
    chain = names.vm_chain(PEER, "spoof")
    ping = ["/bin/busybox", "ping", "-c", "2", "-W", "2", env.addrs[WEB]]
    assert env.served.call("exec", id=PEER, argv=ping)["code"] == 0
    with netns.inside(env.a):
        before = sum(nft.counters("bridge", chain))
    spoofed = "52:54:00:de:ad:01"
    # The guest's real MAC is what the spec derived; read it from the guest to restore it.
    real = env.served.call("exec", id=PEER, argv=["/bin/cat", "/sys/class/net/eth0/address"])
    mac = real["output"].strip()
    sh = (f"ip link set eth0 address {spoofed} && ip neigh flush dev eth0; "
          f"{' '.join(ping)}; r=$?; ip link set eth0 address {mac}; exit $r")
    spoof = env.served.call("exec", id=PEER, argv=["/bin/sh", "-c", sh], timeout=60)
    assert spoof["code"] != 0, spoof
    with netns.inside(env.a):
        after = sum(nft.counters("bridge", chain))
    assert after > before
    assert env.served.call("exec", id=PEER, argv=ping)["code"] == 0  # its own MAC passes again


def test_qemu_crash_leaves_no_tap_or_rules(env: Env) -> None:
    assert links_of(env.a, PEER) and chains_of(env.a, PEER)
    os.kill(env.pids[PEER], signal.SIGSEGV)
    result = env.served.call("wait", id=PEER, timeout=60)["result"]
    assert "crash" in result or "signal" in result, result
    assert links_of(env.a, PEER) == [] and chains_of(env.a, PEER) == []


def test_kill9_then_recovery_then_stop_leaves_nothing(env: Env) -> None:
    dns = dnsmasq_pid(env.state)
    assert dns is not None
    env.served.kill9()
    # The VMs, their links and rules, and dnsmasq outlive the supervisor.
    assert alive(env.pids[WEB]) and alive(env.pids[MV]) and alive(dns)
    assert links_of(env.a, WEB) and links_of(env.a, MV) and chains_of(env.a, WEB)
    served = Served(env.a, env.config, env.state / "server2.log")
    env.served = served
    assert sorted(served.call("recover")["ids"]) == sorted([WEB, MV])
    # What the dead supervisor learned is known at once (and stays locked).
    assert served.call("addresses", id=MV, wait=0)["addresses"] == [env.addrs[MV]]
    # The new supervisor runs the network's dnsmasq now; the old one is gone.
    new_dns = dnsmasq_pid(env.state)
    assert new_dns is not None and new_dns != dns and not alive(dns)
    assert served.call("addresses", id=WEB, wait=60)["addresses"][0] == env.addrs[WEB]
    assert PAGE in _curl(env.b, f"http://{A_ADDR}:{HOST_PORT}/")
    for vm_id in (WEB, MV):
        served.call("stop", id=vm_id, timeout=90)
        assert links_of(env.a, vm_id) == [] and chains_of(env.a, vm_id) == [], vm_id
    assert not alive(env.pids[WEB]) and not alive(env.pids[MV])
    served.close()
    deadline = time.monotonic() + 10
    while alive(new_dns) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dnsmasq_pid(env.state) is None and not alive(new_dns)
    with netns.inside(env.a):
        left = [name for _, name in nft.chains() if name.startswith(names.VM_CHAIN_PREFIX)]
    assert left == []
