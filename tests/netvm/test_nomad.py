"""The plugin's DriverNetwork and address events, with the plugin running in a namespace.

Nomad starts the plugin; here it starts inside namespace A (``ip netns exec``),
so the managed bridge, dnsmasq, taps and rules it makes live there. A virt task
on the managed bridge publishes ``http``. With ``address_wait`` short, StartTask
returns without an address and says so in a task event; an address the guest
adds later is a task event; with it long enough, StartTask returns the guest's
address and the port map with AutoAdvertise.
"""

from __future__ import annotations

import ipaddress
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netvm.conftest import BRIDGE, SUBNET, cleanup, links_of, state_tmp
from tests.network import netns
from tests.network.qga import Agent
from tests.nomad.conftest import Alloc
from tests.nomad.nomadsim import Plugin, cty_msgpack, install_launcher, nomad_env
from tests.virt.test_plugin import disk
from vmdriver.jobfile.dialects import DIALECTS
from vmdriver.nomad.hclspec import task_config_spec
from vmdriver.nomad.proto import driver_pb2 as pb
from vmdriver.runtime.netconfig import saved_addresses
from vmdriver.runtime.supervisor import Supervisor

pytestmark = [pytest.mark.timeout(600)]
HOST_PORT = 20081
BOOT_S = 240.0


class Events:
    """Every task event of the plugin, collected by a thread."""

    def __init__(self, plugin: Plugin) -> None:
        self.stream = plugin.driver.TaskEvents(pb.TaskEventsRequest())
        self.q: queue.Queue[pb.DriverTaskEvent] = queue.Queue()
        self.seen: list[pb.DriverTaskEvent] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        try:
            for ev in self.stream:
                self.q.put(ev)
        except Exception:  # cancelled at the end
            return

    def wait_for(self, task_id: str, words: str, timeout: float) -> pb.DriverTaskEvent:
        for ev in self.seen:
            if ev.task_id == task_id and words in ev.message:
                return ev
        while True:
            try:
                ev = self.q.get(timeout=timeout)
            except queue.Empty:
                msgs = [e.message for e in self.seen if e.task_id == task_id]
                raise AssertionError(f"no event {words!r} for {task_id}; got {msgs}") from None
            self.seen.append(ev)
            if ev.task_id == task_id and words in ev.message:
                return ev


@pytest.fixture(scope="module")
def env(guest_dir: Path) -> Iterator[tuple[str, Path, Plugin, Events]]:
    a, place = netns.unique("vmdna"), state_tmp()
    plugin = None
    try:
        netns.create(a)
        launcher = install_launcher(place / "plugins", "virt")
        plugin = Plugin(["ip", "netns", "exec", a, str(launcher)], env=nomad_env())
        configure(plugin, place, guest_dir, "1s")
        yield a, place, plugin, Events(plugin)
    finally:
        if plugin is not None:
            plugin.close()
        cleanup([a], place)


def configure(plugin: Plugin, place: Path, guest_dir: Path, wait: str) -> None:
    plugin.configure({
        "state_dir": str(place / "state"), "image_paths": [str(guest_dir)],
        "virt_accelerator": "tcg", "jail": "off", "address_wait": wait,
        "storage_pools": {"default": None, "ceph": {},
                          "directory": {"local": {"path": str(place / "pool")}}},
        "provider": {}, "network": {"default": {"bridge": BRIDGE, "subnet": SUBNET}},
    })


def supervisor_addresses(state: Path, task_id: str, timeout: float) -> tuple[str, ...]:
    """The addresses the plugin's supervisor learned for a task (what `vmdriver ps` shows)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rec, _ in Supervisor.known(state):
            if rec.id == task_id and (found := saved_addresses(Path(rec.runtime_dir))):
                return found
        time.sleep(0.5)
    raise AssertionError(f"the supervisor learned no address for {task_id} in {timeout}s")


def start(plugin: Plugin, alloc: Alloc, guest_dir: Path, name: str, port: int
          ) -> tuple[pb.TaskConfig, pb.StartTaskResponse]:
    config: dict[str, Any] = {
        "disk": [disk(str(guest_dir / "disk.qcow2"), chained=True, primary=True)],
        "network_interface": [{"bridge": {"name": BRIDGE, "ports": ["http"]}, "macvtap": None}],
    }
    task, _ = alloc.task(name, {}, memory_mb=256, ports=(("http", port, 8080),))
    task.msgpack_driver_config = cty_msgpack(config, task_config_spec(DIALECTS["virt"]))
    return task, plugin.driver.StartTask(pb.StartTaskRequest(task=task), timeout=BOOT_S + 60)


def test_start_without_address_then_changes_are_events_then_driver_network(
        env: tuple[str, Path, Plugin, Events], guest_dir: Path) -> None:
    a, place, plugin, events = env
    alloc = Alloc(place / "alloc")
    try:
        # address_wait 1s: no TCG guest has an address that fast.
        task, resp = start(plugin, alloc, guest_dir, "slow", HOST_PORT + 1)
        assert not resp.HasField("network_override")
        events.wait_for(task.id, "no guest address within 1s", 10)
        events.wait_for(task.id, "IP known", BOOT_S)
        first = supervisor_addresses(place / "state", task.id, BOOT_S)
        assert len(first) == 1 and ipaddress.ip_address(first[0]) in ipaddress.ip_network(SUBNET)
        # An address of a family the guest had none of is learned: a task event.
        inspect = plugin.driver.InspectTask(pb.InspectTaskRequest(task_id=task.id), timeout=5)
        agent = Agent(Path(inspect.driver.attributes["qmp_socket"]).with_name("qga.sock"))
        code, out = agent.run("/bin/busybox", "ip", "-6", "addr", "add", "fd00:99::5/64",
                              "dev", "eth0")
        assert code == 0, out
        ev = events.wait_for(task.id, "guest address changed", 60)
        assert ev.annotations["addresses"].endswith("fd00:99::5")

        configure(plugin, place, guest_dir, f"{BOOT_S:.0f}s")
        task2, resp2 = start(plugin, alloc, guest_dir, "fast", HOST_PORT)
        assert resp2.HasField("network_override"), plugin.stderr()[-2000:]
        net = resp2.network_override
        assert ipaddress.ip_address(net.addr) in ipaddress.ip_network(SUBNET)
        assert dict(net.port_map) == {"http": 8080} and net.auto_advertise
        page = netns.in_ns(a, "curl", "-s", "--max-time", "10", f"http://127.0.0.1:{HOST_PORT}/")
        assert "vmdriver-test-guest" in page.stdout
        for t in (task, task2):
            plugin.driver.DestroyTask(pb.DestroyTaskRequest(task_id=t.id, force=True), timeout=60)
            assert links_of(a, t.id) == []
    finally:
        alloc.close()
