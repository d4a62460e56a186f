"""Fixtures: namespace A (host: bridge, dnsmasq, QEMU), namespace B (a client), two VMs.

Topology (all inside namespaces this module creates)::

    B: vB 10.214.0.2, fd00:214::2 ── veth ── A: vA 10.214.0.1, fd00:214::1
                                             A: vmdbr0 10.213.0.1/24, fd00:213::1/64
                                                dnsmasq (DHCP, RA), NAT
                                                tap vm-a ── QEMU (guest)
                                                tap vm-b ── QEMU (guest)

Booted VMs are module-scoped: two TCG boots serve every test.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.network import netns
from tests.network.qga import Agent
from vmdriver.network import HostNetwork, NetworkSettings, NicRequest, VmNetwork
from vmdriver.network.dnsmasq import Dnsmasq

BRIDGE = "vmdbr0"
SUBNET = "10.213.0.0/24"
SUBNET6 = "fd00:213::/64"
A_ADDR, B_ADDR = "10.214.0.1", "10.214.0.2"
A_ADDR6, B_ADDR6 = "fd00:214::1", "fd00:214::2"
BOOT_TIMEOUT = 150.0
_READY = re.compile(r"VMDRIVER-GUEST-READY ip=(\S+)")


@dataclass
class Topo:
    a: str
    b: str
    uplink_a: str  # A's end of the veth to B
    uplink_b: str
    state_dir: Path


@dataclass
class Vm:
    vm_id: str
    vmnet: VmNetwork
    proc: subprocess.Popen[bytes]
    console: Path
    agent: Agent
    ip: str = ""

    @property
    def mac(self) -> str:
        return self.vmnet.nics[0].mac


@pytest.fixture(scope="module")
def topo() -> Iterator[Topo]:
    a, b = netns.unique("vmdta"), netns.unique("vmdtb")
    state = Path(tempfile.mkdtemp(prefix="vmdn-", dir="/tmp"))
    topo = Topo(a, b, "vA", "vB", state)
    try:
        netns.create(a)
        netns.create(b)
        netns.veth(a, topo.uplink_a, b, topo.uplink_b)
        netns.ip("addr", "add", f"{A_ADDR}/24", "dev", topo.uplink_a, ns=a)
        netns.ip("addr", "add", f"{B_ADDR}/24", "dev", topo.uplink_b, ns=b)
        netns.ip("addr", "add", f"{A_ADDR6}/64", "dev", topo.uplink_a, "nodad", ns=a)
        netns.ip("addr", "add", f"{B_ADDR6}/64", "dev", topo.uplink_b, "nodad", ns=b)
        yield topo
    finally:
        netns.remove(b)
        netns.remove(a)
        shutil.rmtree(state, ignore_errors=True)


def settings(topo: Topo) -> NetworkSettings:
    return NetworkSettings.model_validate({
        "networks": [{"default": {"bridge": BRIDGE, "subnet": SUBNET, "ipv6_subnet": SUBNET6}}],
        "allowed_devices": [topo.uplink_a],
    })


@pytest.fixture(scope="module")
def hostnet(topo: Topo) -> Iterator[HostNetwork]:
    """The managed network in A, with dnsmasq run by the library's fallback runner."""
    hn = HostNetwork(settings(topo), topo.state_dir)
    net = hn.settings.networks["default"]
    with netns.inside(topo.a):
        hn.ensure_network(net)
        dns = Dnsmasq(net, topo.state_dir)
        dns.start()
    try:
        yield hn
    finally:
        with netns.inside(topo.a):
            dns.stop()
            hn.remove_network(net)


def boot(topo: Topo, hn: HostNetwork, guest: Path, vm_id: str, nic: NicRequest | None = None) -> Vm:
    """Start a guest in namespace A on one NIC (default: a tap on the managed bridge)."""
    work = topo.state_dir / vm_id.replace("/", "-")
    work.mkdir()
    with netns.inside(topo.a):
        vmnet = hn.attach(vm_id, [nic or NicRequest(0, "tap", bridge=BRIDGE)])
        argv = [
            "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "192", "-nodefaults",
            "-no-user-config", "-display", "none", "-serial", f"file:{work / 'console.log'}",
            "-kernel", str(guest / "vmlinux"), "-initrd", str(guest / "initrd.img"),
            "-append", (guest / "cmdline").read_text().strip(),
            "-netdev", vmnet.netdev_args()[0],
            "-device", f"virtio-net-pci,netdev=net0,mac={vmnet.nics[0].mac}",
            "-device", "virtio-serial",
            "-chardev", f"socket,id=qga,path={work / 'qga.sock'},server=on,wait=off",
            "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
        ]
        # Forked from this thread, so QEMU runs in namespace A; it inherits the tap fd.
        with (work / "qemu.log").open("wb") as log:
            proc = subprocess.Popen(argv, pass_fds=vmnet.pass_fds(), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=log)
    vmnet.close_fds()
    return Vm(vm_id, vmnet, proc, work / "console.log", Agent(work / "qga.sock"))


def wait_ready(vm: Vm, deadline: float) -> None:
    while time.monotonic() < deadline:
        text = vm.console.read_text(errors="replace") if vm.console.exists() else ""
        m = _READY.search(text)
        if m:
            vm.ip = m.group(1)
            return
        if vm.proc.poll() is not None:
            qemu_log = (vm.console.parent / "qemu.log").read_text(errors="replace")
            raise AssertionError(f"QEMU of {vm.vm_id} exited {vm.proc.returncode}: {qemu_log}")
        time.sleep(0.2)
    raise AssertionError(f"{vm.vm_id} not ready in {BOOT_TIMEOUT}s: {text[-500:]}")


@pytest.fixture(scope="module")
def vms(topo: Topo, hostnet: HostNetwork, guest_dir: Path) -> Iterator[list[Vm]]:
    """Two guests on the managed bridge, booted in parallel (one TCG boot each)."""
    booted: list[Vm] = []
    try:
        for vm_id in ("alloc-a/web", "alloc-b/web"):
            booted.append(boot(topo, hostnet, guest_dir, vm_id))
        deadline = time.monotonic() + BOOT_TIMEOUT
        for vm in booted:
            wait_ready(vm, deadline)
        yield booted
    finally:
        for vm in booted:
            if vm.proc.poll() is None:
                vm.proc.kill()
            vm.proc.wait(10)
            with netns.inside(topo.a), contextlib.suppress(Exception):
                hostnet.detach(vm.vm_id, vm.vmnet)


def in_subnet(addr: str, subnet: str) -> bool:
    return ipaddress.ip_address(addr) in ipaddress.ip_network(subnet)
