"""``network_interface { bridge { name, ports } }`` end to end, in a network namespace.

`vmdriver run` runs inside a namespace this test creates, with a managed
network on ``virbr0`` there (the bridge nomad-driver-virt's README uses): the
VM's tap joins it, dnsmasq gives the guest an address, and the job's port
label is published to the guest's port. Nothing outside the namespace is touched.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cloudinit.guest import cloud_guest_dir
from tests.network import netns
from tests.virt.helpers import READY, VMDRIVER, host_file, job_file, volumes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PORT = 18080
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIG = """
disk {
  chained = true
  source {
    image = "GUEST/disk.qcow2"
  }
}
network_interface {
  bridge {
    name  = "virbr0"
    ports = ["http"]
  }
}
"""
NETWORK = f'network {{\n port "http" {{\n static = {PORT}\n to = 8080\n }}\n}}'
MANAGED = 'network "default" {\n bridge = "virbr0"\n subnet = "192.168.122.0/24"\n}'


@pytest.fixture
def ns() -> Iterator[str]:
    if shutil.which("ip") is None:
        pytest.skip("iproute2's ip is needed to make a network namespace")
    name = netns.unique("vmdvt")
    netns.create(name)
    try:
        yield name
    finally:
        netns.remove(name)


def test_bridge_interface_publishes_the_jobs_port(ns: str, guest_dir: Path) -> None:
    state = Path(tempfile.mkdtemp(prefix="vtn-", dir="/tmp"))
    try:
        pool = state / "pool"
        host = host_file(state, pool, (guest_dir,), MANAGED)
        job = job_file(state, CONFIG.replace("GUEST", str(guest_dir)), network=NETWORK)
        proc = subprocess.Popen(
            ("ip", "netns", "exec", ns, VMDRIVER, "run", str(job), "--host-config", str(host),
             "--state-dir", str(state / "s"), "--ready", READY, "--quiet"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "ready" in line or "error" in line:
                break
        assert "ready" in lines[-1], "".join(lines)
        # The tap is on the namespace's virbr0; the port answers from the guest's httpd.
        links = netns.ip("-o", "link", "show", "master", "virbr0", ns=ns)
        assert links.strip(), "no tap on virbr0"
        deadline = time.monotonic() + 60
        body = ""
        while time.monotonic() < deadline and "vmdriver-test-guest" not in body:
            body = netns.in_ns(ns, "curl", "-s", "-m", "3", f"http://192.168.122.1:{PORT}/").stdout
            time.sleep(1)
        assert "vmdriver-test-guest" in body
        proc.send_signal(signal.SIGINT)  # Ctrl-C: `ip netns exec` exec'd vmdriver itself
        code = proc.wait(90)
        rest = proc.stderr.read()
        proc.stderr.close()
        assert code == 0, rest
        assert volumes(pool) == []
        assert not netns.ip("-o", "link", "show", "master", "virbr0", ns=ns).strip()
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_python_server_example_on_the_cloud_guest(ns: str) -> None:
    """Seed 003's first example as shipped (cloud image, password, cmds, bridge port), in a netns."""
    image = cloud_guest_dir() / "disk.qcow2"
    state = Path(tempfile.mkdtemp(prefix="vtw-", dir="/tmp"))
    try:
        pool = state / "pool"
        host = host_file(state, pool, (image.parent,), MANAGED)
        text = (EXAMPLES / "virt-python-server.nomad.hcl").read_text()
        text = text.replace('source      = "../guest/cloud/out/disk.qcow2"',
                            f'source      = "{image}"')
        job = state / "python.nomad.hcl"
        job.write_text(text.replace("to = 8000", f"static = {PORT}\n        to = 8000"))
        proc = subprocess.Popen(
            ("ip", "netns", "exec", ns, VMDRIVER, "run", str(job), "--host-config", str(host),
             "--state-dir", str(state / "s"), "--quiet"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            t0 = time.monotonic()
            body = ""
            while time.monotonic() - t0 < 400 and "Directory listing" not in body:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                body = netns.in_ns(ns, "curl", "-s", "-m", "3",
                                   f"http://192.168.122.1:{PORT}/").stdout
                time.sleep(3)
            print(f"\npython server example answered {time.monotonic() - t0:.0f}s after start")
            assert "Directory listing" in body
            assert len(volumes(pool)) == 1
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(120)
            assert proc.stderr is not None
            rest = proc.stderr.read()
            proc.stderr.close()
        assert code == 0, rest
        assert volumes(pool) == []
    finally:
        shutil.rmtree(state, ignore_errors=True)
