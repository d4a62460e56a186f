"""Operator policy, libvirt's virbr0 and teardown through vmdriver.

A supervisor (tests/netvm/server.py) runs in namespace A. Most VMs here have no
disk: QEMU runs its firmware only, which is all the host side needs; one test
guest boots on ``virbr0``. Namespace A also holds the bridges a host would have:
``virbr0`` (made here as libvirt makes it, with its own dnsmasq) and ``br-lan``
(a LAN bridge the operator did not allow).
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netvm.conftest import (
    BRIDGE,
    chains_of,
    cleanup,
    dnsmasq_pid,
    host_config,
    links_of,
    qemus_in,
    state_tmp,
)
from tests.netvm.harness import Served, ServerError
from tests.network import netns
from tests.virt.helpers import host_file, job_file, volumes

VIRBR = "virbr0"
VIRBR_ADDR = "10.215.0.1/24"
BOOT_S = 240.0


@pytest.fixture(scope="module")
def env(guest_dir: Path) -> Iterator[tuple[str, Path, Served]]:
    a, state = netns.unique("vmdpa"), state_tmp()
    try:
        netns.create(a)
        for br in (VIRBR, "br-lan"):
            netns.ip("link", "add", br, "type", "bridge", ns=a)
            netns.ip("link", "set", br, "up", ns=a)
        netns.ip("addr", "add", VIRBR_ADDR, "dev", VIRBR, ns=a)
        # As libvirt does: a fixed MAC, so the bridge never takes a port's.
        netns.ip("link", "set", VIRBR, "address", "52:54:00:0b:0b:01", ns=a)
        netns.ip("link", "add", "eth1", "type", "veth", "peer", "name", "eth1p", ns=a)
        served = Served(a, host_config(state, guest_dir, allowed_bridges=[VIRBR]),
                        state / "server.log")
        yield a, state, served
        served.close()
    finally:
        cleanup([a], state)


@pytest.fixture(scope="module")
def libvirt_dnsmasq(env: tuple[str, Path, Served]) -> Iterator[subprocess.Popen[bytes]]:
    """DHCP on virbr0 as libvirt's own dnsmasq would serve it (vmdriver's is not involved)."""
    a, state, _ = env
    proc = subprocess.Popen(
        ["ip", "netns", "exec", a, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
         "--bind-interfaces", f"--interface={VIRBR}", "--except-interface=lo", "--port=0",
         "--no-ping", "--dhcp-range=10.215.0.100,10.215.0.150,255.255.255.0,1h",
         f"--dhcp-leasefile={state / 'libvirt.leases'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield proc
    proc.kill()
    proc.wait(10)


def tap_nic(bridge: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "tap", "id": "net0", "bridge": bridge, **extra}


def link_json(ns: str, name: str) -> dict[str, Any]:
    out = netns.ip("-j", "-d", "addr", "show", "dev", name, ns=ns)
    return dict(json.loads(out)[0])


@pytest.mark.parametrize(("nic", "message"), [
    (tap_nic("br-lan"), "network_interface[0].bridge: bridge not allowed by the host config "
                        f"(got 'br-lan'; allowed: {BRIDGE}, {VIRBR})"),
    ({"kind": "macvtap", "id": "net0", "device": "eth1"},
     "network_interface[0].device: host device not allowed for macvtap by the host config "
     "(got 'eth1'; allowed: none (allowed_devices is empty))"),
])
def test_not_allowed_is_refused_before_launch(env: tuple[str, Path, Served], nic: dict[str, Any],
                                              message: str) -> None:
    a, state, served = env
    with pytest.raises(ServerError) as err:
        served.call("start", vms=[{"id": "p1/refused", "nics": [nic]}])
    assert err.value.reply["type"] == "PolicyError"
    assert err.value.reply["error"] == message
    assert links_of(a, "p1/refused") == [] and chains_of(a, "p1/refused") == []
    assert qemus_in(a) == []
    # Nothing else was set up for it either: no managed bridge, no dnsmasq, no runtime dir.
    assert BRIDGE not in netns.ip("-br", "link", ns=a)
    assert dnsmasq_pid(state) is None
    assert not any((state / "run").glob("*"))


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = state_tmp()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_vmdriver_run_refuses_a_job_on_a_bridge_not_allowed(env: tuple[str, Path, Served],
                                                             guest_dir: Path, short_tmp: Path
                                                             ) -> None:
    """The same refusal for a job file: one line, exit 2, no volume, no QEMU."""
    a, _, _ = env
    tmp_path = short_tmp
    pool = tmp_path / "pool"
    host = host_file(tmp_path, pool, (guest_dir,),
                     f'allowed_bridges = ["{VIRBR}"]\nnetwork "default" {{\n bridge = "{BRIDGE}"\n'
                     f' subnet = "10.213.0.0/24"\n}}')
    job = job_file(tmp_path, f'disk {{\n source {{\n image = "{guest_dir}/disk.qcow2"\n }}\n}}\n'
                   'network_interface {\n bridge {\n name = "br-lan"\n }\n}')
    vmdriver = str(Path(sys.executable).with_name("vmdriver"))
    run = netns.in_ns(a, vmdriver, "run", str(job), "--host-config", str(host),
                      "--state-dir", str(tmp_path / "s"), "--quiet", timeout=120)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr
    assert lines == ["vmdriver: error: network_interface[0].bridge: bridge not allowed by the "
                     f"host config (got 'br-lan'; allowed: {BRIDGE}, {VIRBR})"], run.stderr
    assert volumes(pool) == []
    assert qemus_in(a) == []
    assert "vmd" not in netns.ip("-br", "link", ns=a)


def test_virbr0_is_used_as_is(env: tuple[str, Path, Served]) -> None:
    """A listed host bridge: the VM's tap joins it; vmdriver creates, changes and removes
    nothing of the bridge itself (no address, alias, dnsmasq), and the tap goes on stop."""
    a, state, served = env
    before = link_json(a, VIRBR)
    served.call("start", vms=[{"id": "p2/libvirt", "nics": [tap_nic(VIRBR)]}])
    (tap,) = links_of(a, "p2/libvirt")
    assert link_json(a, tap)["master"] == VIRBR
    after = link_json(a, VIRBR)
    for key in ("addr_info", "address", "ifalias", "mtu"):  # (operstate: a port is up now)
        assert after.get(key) == before.get(key), key
    assert not (state / "net" / "network" / "virbr0").exists()
    served.call("stop", id="p2/libvirt")
    assert links_of(a, "p2/libvirt") == [] and chains_of(a, "p2/libvirt") == []
    assert link_json(a, VIRBR)["addr_info"] == before["addr_info"]


def test_guest_on_virbr0_is_found_in_the_neighbour_table(
        env: tuple[str, Path, Served], libvirt_dnsmasq: subprocess.Popen[bytes]) -> None:
    """A guest without an agent on a bridge vmdriver does not manage (no leases of its own):
    its address comes from the neighbour table, its published port answers, and stopping
    it leaves libvirt's bridge and dnsmasq as they were."""
    a, state, served = env
    nic = tap_nic(VIRBR, forwards=[{"label": "http", "host_port": 20090, "guest_port": 8080}])
    served.call("start", vms=[{"id": "p4/onvirbr", "nics": [nic], "boot": True}])
    (addr,) = served.call("addresses", timeout=BOOT_S + 10, id="p4/onvirbr", wait=BOOT_S)["addresses"]
    assert ipaddress.ip_address(addr) in ipaddress.ip_network("10.215.0.0/24")
    (saved,) = state.glob("run/*/addresses.json")
    assert json.loads(saved.read_text())["source"] == "neighbours"
    page = netns.in_ns(a, "curl", "-s", "--max-time", "10", "http://127.0.0.1:20090/")
    assert "vmdriver-test-guest" in page.stdout
    served.call("stop", id="p4/onvirbr", timeout=90)
    assert links_of(a, "p4/onvirbr") == [] and chains_of(a, "p4/onvirbr") == []
    assert libvirt_dnsmasq.poll() is None and VIRBR_ADDR.removesuffix("/24") in netns.ip(
        "-br", "addr", "show", "dev", VIRBR, ns=a)


def test_managed_network_torn_down_on_stop_and_close(env: tuple[str, Path, Served]) -> None:
    """Tap and chains go when the VM stops; the network's dnsmasq when the supervisor closes."""
    a, state, served = env
    nic = tap_nic(BRIDGE, forwards=[{"label": "http", "host_port": 20080, "guest_port": 8080}])
    served.call("start", vms=[{"id": "p3/managed", "nics": [nic]}])
    (tap,) = links_of(a, "p3/managed")
    assert link_json(a, tap)["master"] == BRIDGE
    assert chains_of(a, "p3/managed"), "no anti-spoofing chain"
    pid = dnsmasq_pid(state)
    assert pid is not None and pid in netns.pids(a)
    served.call("stop", id="p3/managed")
    assert links_of(a, "p3/managed") == [] and chains_of(a, "p3/managed") == []
    assert qemus_in(a) == []
    served.close()
    assert dnsmasq_pid(state) is None and pid not in netns.pids(a)

