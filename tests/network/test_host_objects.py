"""Taps, macvtap, anti-spoofing, policy, teardown and crash recovery, in namespaces, without guests."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.network import netns
from tests.network.crash_owner import CRASH_VM, crash_settings
from vmdriver.errors import HostError, PolicyError
from vmdriver.network import (
    GuestAddresses,
    HostNetwork,
    NetworkSettings,
    NicRequest,
    PortMap,
    nft,
    vhost_net_status,
)
from vmdriver.network import names as nm
from vmdriver.network.dnsmasq import Dnsmasq, running_pid
from vmdriver.network.tap import IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, open_tap, tap_flags

REPO = Path(__file__).resolve().parents[2]
ETH_P_ALL = 0x0003
EXPERIMENTAL_ETHERTYPE = 0x88B5
SETTINGS = NetworkSettings.model_validate(
    {"networks": {"lab": {"bridge": "vmdbr2", "subnet": "10.217.0.0/24"}}})


@pytest.fixture(scope="module")
def ns() -> Iterator[tuple[str, str, Path]]:
    """Namespaces C (host side) and D (a neighbour on a veth), and a state dir."""
    c, d = netns.unique("vmdtc"), netns.unique("vmdtd")
    state = Path(tempfile.mkdtemp(prefix="vmdn-", dir="/tmp"))
    try:
        netns.create(c)
        netns.create(d)
        netns.veth(c, "vC", d, "vD")
        yield c, d, state
    finally:
        netns.remove(d)
        netns.remove(c)
        shutil.rmtree(state, ignore_errors=True)


def _links(ns: str) -> list[str]:
    """Link names in a namespace."""
    return [line.split(":")[1].strip().split("@")[0] for line in netns.ip("-o", "link", ns=ns).splitlines()]


def _vmd_links(ns: str) -> list[str]:
    return [n for n in _links(ns) if nm.link_key(n)]


def _frame(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    return bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", "")) + \
        struct.pack("!H", ethertype) + payload.ljust(46, b"\0")


def _capture(ifname: str, marker: bytes, seconds: float) -> list[bytes]:
    """Frames carrying ``marker`` seen on ``ifname`` (caller is in the right namespace)."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as s:
        s.bind((ifname, 0))
        s.settimeout(0.1)
        got, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                data = s.recv(4096)
                if marker in data:
                    got.append(data)
        return got


def test_tap_flags_queues_and_lifetime(ns: tuple[str, str, Path]) -> None:
    c, _, _ = ns
    with netns.inside(c):
        tap = open_tap("vmdtestq", guest_mac="52:54:00:aa:bb:01", vhost=False)
        name, flags = tap_flags(tap.fds[0])
        assert name == "vmdtestq"
        assert flags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) == IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        assert not flags & IFF_MULTI_QUEUE
        assert tap.netdev("n0") == f"tap,id=n0,fd={tap.fds[0]}"
        mq = open_tap("vmdtestmq", guest_mac="52:54:00:aa:bb:02", queues=2, vhost=False)
        assert len(mq.fds) == 2 and tap_flags(mq.fds[1])[1] & IFF_MULTI_QUEUE
        assert mq.netdev("n1").startswith("tap,id=n1,fds=")
        assert "fe:54:00:aa:bb:01" in netns.ip("-o", "link", "show", "vmdtestq", ns=c)
        tap.close()
        mq.close()
    # Not persistent: the kernel removed them with their last fd.
    assert not [n for n in _links(c) if n.startswith("vmdtest")]


def test_vhost_net(ns: tuple[str, str, Path]) -> None:
    ok, reason = vhost_net_status()
    if not ok:
        pytest.skip(f"vhost-net: {reason}")
    c, _, _ = ns
    with netns.inside(c):
        tap = open_tap("vmdtestvh", guest_mac="52:54:00:aa:bb:03", vhost=True)
        try:
            assert tap.vhost_fds and "vhost=on,vhostfd=" in tap.netdev("n0")
        finally:
            tap.close()


def test_policy_refuses_before_creating_anything(ns: tuple[str, str, Path]) -> None:
    c, _, state = ns
    hn = HostNetwork(SETTINGS, state)
    before = _links(c)
    with netns.inside(c), pytest.raises(PolicyError, match="bridge not allowed") as exc:
        hn.attach("pol/vm", [NicRequest(0, "tap", bridge="vmdbr2"), NicRequest(1, "tap", bridge="br-lan")])
    assert "network_interface[1].bridge" in str(exc.value) and "\n" not in str(exc.value)
    with netns.inside(c), pytest.raises(PolicyError, match="allowed_devices is empty"):
        hn.attach("pol/vm", [NicRequest(0, "macvtap", device="vC")])
    assert _links(c) == before


def test_an_allowed_host_bridge_is_used_as_is(ns: tuple[str, str, Path]) -> None:
    """``virbr0`` (here a bridge the test makes, as libvirt would) is joined, never managed."""
    c, _, state = ns
    hn = HostNetwork(NetworkSettings(allowed_bridges=("virbr0",)), state)
    netns.ip("link", "add", "virbr0", "type", "bridge", ns=c)
    netns.ip("addr", "add", "192.168.122.1/24", "dev", "virbr0", ns=c)
    try:
        before = netns.ip("-o", "addr", "show", "virbr0", ns=c)
        with netns.inside(c):
            vmnet = hn.attach("libvirt/vm", [NicRequest(0, "tap", bridge="virbr0")])
            assert "master virbr0" in netns.ip("-o", "link", "show", vmnet.nics[0].tap.name, ns=c)
            vmnet.close_fds()
            done = hn.reconcile([], keep_networks=[])
        assert done.bridges == [] and "virbr0" in _links(c)
        assert netns.ip("-o", "addr", "show", "virbr0", ns=c) == before
    finally:
        netns.ip("link", "del", "virbr0", ns=c)


def test_a_managed_network_never_takes_over_a_foreign_bridge(ns: tuple[str, str, Path]) -> None:
    c, _, state = ns
    hn = HostNetwork(SETTINGS, state)
    net = SETTINGS.networks["lab"]
    netns.ip("link", "add", net.bridge, "type", "bridge", ns=c)
    try:
        with netns.inside(c), pytest.raises(HostError, match="already exists and is not vmdriver's"):
            hn.ensure_network(net)
        assert "inet " not in netns.ip("-o", "addr", "show", net.bridge, ns=c)
        with netns.inside(c):
            assert hn.reconcile([], keep_networks=[]).bridges == []
    finally:
        netns.ip("link", "del", net.bridge, ns=c)


def test_a_missing_bridge_is_one_clear_error(ns: tuple[str, str, Path]) -> None:
    c, _, state = ns
    hn = HostNetwork(NetworkSettings(allowed_bridges=("virbr0",)), state)
    with netns.inside(c), pytest.raises(HostError, match="bridge virbr0 does not exist"):
        hn.attach("nolibvirt/vm", [NicRequest(0, "tap", bridge="virbr0")])
    assert not _vmd_links(c)


def test_spoofed_source_mac_is_dropped_at_the_bridge(ns: tuple[str, str, Path]) -> None:
    """A veth port on the bridge stands in for a VM's tap; frames are crafted on its far end."""
    c, _, state = ns
    hn = HostNetwork(SETTINGS, state)
    net = SETTINGS.networks["lab"]
    good, bad = "52:54:00:12:34:56", "52:54:00:66:66:66"
    with netns.inside(c):
        hn.ensure_network(net)
        netns.ip("link", "add", "vsVm", "type", "veth", "peer", "name", "vsPort", ns=c)
        netns.ip("link", "set", "vsPort", "master", net.bridge, "up", ns=c)
        netns.ip("link", "set", "vsVm", "address", good, "up", ns=c)
        nft.guard("standin/vm", [nft.Guard("vsPort", good)])
        try:
            chain = nm.vm_chain("standin/vm", "spoof")
            seen: dict[str, list[bytes]] = {}
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as tx:
                tx.bind(("vsVm", 0))
                for label, src in (("bad", bad), ("good", good)):
                    marker = f"vmdriver-spoof-{label}".encode()
                    frame = _frame("ff:ff:ff:ff:ff:ff", src, EXPERIMENTAL_ETHERTYPE, marker)
                    cap = _start_capture(c, net.bridge, marker)
                    time.sleep(0.2)
                    tx.send(frame)
                    seen[label] = cap()
            counts = nft.counters("bridge", chain)
        finally:
            nft.remove_vm("standin/vm")
            netns.ip("link", "del", "vsVm", ns=c)
            hn.remove_network(net)
    assert seen["good"], "a frame with the VM's own MAC did not reach the bridge"
    assert not seen["bad"], "a frame with a spoofed source MAC reached the bridge"
    assert counts[0] == 1, f"drop counter: {counts}"


def _start_capture(ns: str, ifname: str, marker: bytes) -> Callable[[], list[bytes]]:
    """Capture for a second in a thread inside ``ns``; returns a function joining it."""
    out: list[bytes] = []

    def run() -> None:
        with netns.inside(ns):
            out.extend(_capture(ifname, marker, 1.0))

    t = threading.Thread(target=run)
    t.start()

    def join() -> list[bytes]:
        t.join()
        return out

    return join


@pytest.mark.parametrize("mode", ["bridge", "private", "vepa", "passthrough"])
def test_macvtap_between_two_namespaces(ns: tuple[str, str, Path], mode: str) -> None:
    c, d, state = ns
    hn = HostNetwork(NetworkSettings(allowed_devices=("vC",)), state)
    mac = "52:54:00:77:00:01"
    d_mac = netns.ip("-o", "link", "show", "vD", ns=d).split("link/ether ")[1].split()[0]
    with netns.inside(c):
        try:
            vmnet = hn.attach("mv/vm", [NicRequest(0, "macvtap", device="vC", mac=mac, mode=mode)])
        except HostError as exc:
            if "no macvtap support" in str(exc):  # the only case that may skip
                pytest.skip(str(exc))
            raise
    fd = vmnet.nics[0].tap.fds[0]
    try:
        details = netns.ip("-d", "-o", "link", "show", vmnet.nics[0].tap.name, ns=c)
        assert f"macvtap mode {mode.replace('passthrough', 'passthru')}" in details
        # Guest → D: what QEMU writes into the fd (virtio-net header + frame) leaves on vC.
        join = _start_capture(d, "vD", b"vmdriver-mvtap-out")
        time.sleep(0.2)
        os.write(fd, bytes(10) + _frame(d_mac, mac, EXPERIMENTAL_ETHERTYPE, b"vmdriver-mvtap-out"))
        assert join(), "frame written to the macvtap fd did not reach namespace D"
        # A frame the guest sends with another source MAC never leaves.
        join = _start_capture(d, "vD", b"vmdriver-mvtap-spoof")
        time.sleep(0.2)
        os.write(fd, bytes(10) + _frame(d_mac, "52:54:00:66:66:66", EXPERIMENTAL_ETHERTYPE,
                                        b"vmdriver-mvtap-spoof"))
        assert not join(), "a spoofed frame from the macvtap reached namespace D"
        with netns.inside(c):
            assert nft.counters("netdev", nm.vm_chain("mv/vm", "mv0"))[0] == 1
        # D → guest: a frame to the guest's MAC is readable from the fd.
        with netns.inside(d), socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as tx:
            tx.bind(("vD", 0))
            tx.send(_frame(mac, d_mac, EXPERIMENTAL_ETHERTYPE, b"vmdriver-mvtap-in"))
        os.set_blocking(fd, False)
        got = b""
        for _ in range(50):
            with contextlib.suppress(BlockingIOError):
                got = os.read(fd, 4096)
                if b"vmdriver-mvtap-in" in got:
                    break
            time.sleep(0.05)
        assert b"vmdriver-mvtap-in" in got
    finally:
        with netns.inside(c):
            hn.detach("mv/vm", vmnet)
    assert vmnet.nics[0].tap.name not in _links(c)


def test_stop_leaves_nothing(ns: tuple[str, str, Path]) -> None:
    c, _, state = ns
    hn = HostNetwork(SETTINGS, state)
    net = SETTINGS.networks["lab"]
    with netns.inside(c):
        hn.ensure_network(net)
        dns = Dnsmasq(net, state)
        pid = dns.start()
        vmnet = hn.attach("stop/vm", [NicRequest(0, "tap", bridge=net.bridge)])
        hn.publish("stop/vm", [PortMap(21001, 80)], [ipaddress.ip_address("10.217.0.5")])
        vmnet.close_fds()  # QEMU would hold them; it has exited
        hn.detach("stop/vm", vmnet)
        dns.stop()
        hn.remove_network(net)
        left = [n for _, n in nft.chains()]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert left == ["localhost-snat"], left
    assert not _vmd_links(c)


def test_a_recovered_vm_is_guarded_and_detached_like_an_attached_one(ns: tuple[str, str, Path]) -> None:
    """A new vmdriver re-attaching to a QEMU that outlived the old one (a child holds the tap)."""
    c, _, state = ns
    hn = HostNetwork(SETTINGS, state)
    net = SETTINGS.networks["lab"]
    reqs = [NicRequest(0, "tap", id="n0", bridge=net.bridge, mac="52:54:00:21:00:01")]
    with netns.inside(c):
        hn.ensure_network(net)
        vmnet = hn.attach("rec/vm", reqs)
        qemu = subprocess.Popen(["sleep", "60"], pass_fds=vmnet.pass_fds())
    vmnet.close_fds()
    try:
        with netns.inside(c):
            again = hn.recover("rec/vm", reqs)
            assert [n.tap.name for n in again.nics] == [n.tap.name for n in vmnet.nics]
            hn.guard_addresses(again, {0: GuestAddresses((ipaddress.IPv4Address("10.217.0.9"),))})
            rules = nft.run([{"list": {"chain": {"family": "bridge", "table": nm.TABLE,
                                                  "name": nm.vm_chain("rec/vm", "spoof")}}}])
            assert "10.217.0.9" in json.dumps(rules)
            hn.detach("rec/vm", again)
            left = [n for _, n in nft.chains()]
        assert not _vmd_links(c), "the tap QEMU still holds was not removed"
        assert not [n for n in left if n.startswith(f"vm-{nm.vm_key('rec/vm')}")]
    finally:
        qemu.kill()
        qemu.wait()
        with netns.inside(c):
            hn.remove_network(net)


def test_reconcile_after_kill_9(ns: tuple[str, str, Path]) -> None:
    c, _, state = ns
    owner = subprocess.Popen(["ip", "netns", "exec", c, sys.executable, "-m", "tests.network.crash_owner",
                              str(state), "vC"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    holder = None
    hn = HostNetwork(crash_settings("vC"), state)
    try:
        line = owner.stdout.readline() if owner.stdout else ""
        assert line, "crash owner printed nothing"
        info = json.loads(line)
        holder = info["holder"]
        with netns.inside(c):  # a VM that is still known keeps its tap and rules
            alive = hn.attach("alive/vm", [NicRequest(0, "tap", bridge="vmdbr1")])
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        links = _links(c)
        assert all(name in links for name in info["links"]), "nothing left to reconcile"
        assert running_pid(state, "crashnet") == info["dnsmasq"]

        with netns.inside(c):
            first = hn.reconcile(["alive/vm"], keep_networks=["crashnet"])
            chains = [n for _, n in nft.chains()]
        assert sorted(first.links) == sorted(info["links"])
        assert {nm.vm_chain(CRASH_VM, h) for h in ("dnat", "local", "spoof")} <= set(first.chains)
        assert nm.vm_chain("alive/vm", "spoof") in chains
        assert alive.nics[0].tap.name in _links(c) and "vmdbr1" in _links(c)

        alive.close_fds()
        with netns.inside(c):
            second = hn.reconcile([], keep_networks=[])
            chains = [n for _, n in nft.chains()]
        assert second.dnsmasq == ["crashnet"] and second.bridges == ["vmdbr1"]
        assert running_pid(state, "crashnet") is None
        assert not psutil.pid_exists(info["dnsmasq"])
        assert chains == ["localhost-snat"], chains
        assert not _vmd_links(c)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if owner.stdout:
            owner.stdout.close()
        if holder:
            with contextlib.suppress(ProcessLookupError):
                os.kill(holder, signal.SIGKILL)
