"""`vmdriver run` of a virt job on a managed network, run inside a namespace.

The job's ``network_interface { bridge { name = "vmdbr0", ports = ["http"] } }``
puts the guest on the managed network the host config declares; `vmdriver ps`
shows its lease; `vmdriver stop` (a second supervisor re-attaching while the run
goes on) stops it without taking the run's dnsmasq; when the run ends, its
dnsmasq, the tap and the chains are gone.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netvm.conftest import BRIDGE, SUBNET, chains_of, cleanup, dnsmasq_pid, state_tmp
from tests.network import netns
from tests.virt.helpers import VMDRIVER, Run, host_file, job_file, volumes
from vmdriver.network.tap import vmdriver_links

PORT = 20095
NETWORK = f'network {{\n port "http" {{\n static = {PORT}\n to = 8080\n }}\n}}'


@pytest.fixture
def place() -> Iterator[tuple[str, Path]]:
    a, path = netns.unique("vmdra"), state_tmp()
    try:
        netns.create(a)
        yield a, path
    finally:
        cleanup([a], path)


def vmdriver(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return netns.in_ns(ns, VMDRIVER, *args, timeout=120)


def test_run_on_a_managed_network_then_stop_from_another_process(
        place: tuple[str, Path], guest_dir: Path) -> None:
    a, path = place
    pool, state = path / "pool", path / "s"
    host = host_file(path, pool, (guest_dir,), f'network "default" {{\n'
                     f' bridge = "{BRIDGE}"\n subnet = "{SUBNET}"\n}}')
    job = job_file(path, f'disk {{\n source {{\n image = "{guest_dir}/disk.qcow2"\n }}\n}}\n'
                   f'network_interface {{\n bridge {{\n name = "{BRIDGE}"\n ports = ["http"]\n'
                   ' }\n}', network=NETWORK)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", a, VMDRIVER, "run", str(job), "--host-config", str(host),
         "--state-dir", str(state), "--ready", "VMDRIVER-GUEST-READY", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    run = Run(proc, state, [])
    try:
        run.wait_for("ready", 240)
        dns = dnsmasq_pid(state)
        assert dns is not None
        # Ready is the guest's console line; the port follows once discovery has the lease.
        deadline = time.monotonic() + 30
        page = ""
        while "vmdriver-test-guest" not in page and time.monotonic() < deadline:
            page = netns.in_ns(a, "curl", "-s", "--max-time", "5", f"http://127.0.0.1:{PORT}/").stdout
            time.sleep(0.5)
        assert "vmdriver-test-guest" in page
        ps = vmdriver(a, "ps", "--json", "--state-dir", str(state), "--host-config", str(host))
        (row,) = json.loads(ps.stdout)
        assert row["addresses"] and row["addresses"][0].startswith("10.213.0."), ps.stdout
        stop = vmdriver(a, "stop", "--all", "--state-dir", str(state), "--host-config", str(host))
        assert stop.returncode == 0, stop.stderr
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        # `vmdriver stop` used the run's dnsmasq, never started its own; the run stopped it.
        assert dnsmasq_pid(state) is None
        assert not netns.pids(a)
        with netns.inside(a):
            assert vmdriver_links() == {}
        assert chains_of(a, row["id"]) == []
        assert volumes(pool) == []
    finally:
        run.kill()
