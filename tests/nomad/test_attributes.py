"""The node attributes of the plugin installed as ``virt``: built from vmdriver's state.

No plugin process: the builder, the Attribute conversion and the task counts.
Link state is read from this host's ``/sys/class/net`` (``lo`` always exists).
"""

from __future__ import annotations

import asyncio
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmdriver.errors import TaskNotFound
from vmdriver.host.config import HostConfig
from vmdriver.host.emulators import Emulator
from vmdriver.host.fingerprint import Fingerprint
from vmdriver.host.kvm import KvmVerdict
from vmdriver.jobfile.hostcheck import check_host
from vmdriver.nomad.attributes import (
    libvirt_version,
    link_exists,
    network_attributes,
    pool_attributes,
    to_proto,
    virt_attributes,
)
from vmdriver.nomad.tasks import EventHub, Task, TaskTable
from vmdriver.runtime.netconfig import network_settings
from vmdriver.storage import parse_storage_pools

MISSING = "vmdnosuch0"  # no link of this name on any host these tests run on
POOLS = {
    "default": "remote",
    "directory": {"local": {"path": "/srv/pool"}},
    "ceph": {"remote": {"pool": "nomad", "hosts": ["10.0.0.2:3300"],
                        "authentication": {"username": "nomad", "secret": "QUFBQQ=="}}},
}


def test_emulator_version_is_encoded_as_libvirt_does() -> None:
    assert libvirt_version("8.2.2") == 8_002_002
    assert libvirt_version("7.2.22") == 7_002_022
    assert libvirt_version("10.0") == 10_000_000  # missing parts are 0
    assert libvirt_version("9") == 9_000_000
    assert libvirt_version("9.0.50.1") == 9_000_050  # a fourth part is ignored
    assert libvirt_version("1.1000.0") is None  # would not encode
    assert libvirt_version("unknown") is None


def test_values_keep_their_type_in_the_proto() -> None:
    attrs = to_proto({"b": True, "f": False, "i": 8_002_002, "zero": 0, "s": "directory"})
    assert {k: v.WhichOneof("value") for k, v in attrs.items()} == {
        "b": "bool_val", "f": "bool_val", "i": "int_val", "zero": "int_val", "s": "string_val"}
    assert attrs["b"].bool_val is True and attrs["i"].int_val == 8_002_002
    assert attrs["s"].string_val == "directory"


def test_every_pool_with_its_kind_and_the_default_flagged() -> None:
    pools = parse_storage_pools(POOLS, "test")
    assert pool_attributes(pools) == {
        "driver.virt.storage_pool.local": "directory",
        "driver.virt.storage_pool.local.default": False,
        "driver.virt.storage_pool.local.provider": "vmdriver",
        "driver.virt.storage_pool.remote": "ceph",
        "driver.virt.storage_pool.remote.default": True,
        "driver.virt.storage_pool.remote.provider": "vmdriver",
    }


def test_listed_bridges_are_active_only_while_their_link_exists() -> None:
    assert link_exists("lo") and not link_exists(MISSING) and not link_exists("../lo")
    host = HostConfig(allowed_bridges=("lo", MISSING))
    assert network_attributes(network_settings(host)) == {
        "driver.virt.network.lo.state": "active",
        "driver.virt.network.lo.bridge_name": "lo",
        f"driver.virt.network.{MISSING}.state": "inactive",
        f"driver.virt.network.{MISSING}.bridge_name": MISSING,
    }


def test_managed_networks_are_active_before_their_bridge_is_made() -> None:
    # vmdriver makes the bridge when the first VM needs it: a job constrained to an
    # active network must be placeable on a node that has not made it yet.
    host = HostConfig(network={"default": {"bridge": MISSING, "subnet": "192.168.250.0/24"}},
                      allowed_bridges=(MISSING, "lo"))
    attrs = network_attributes(network_settings(host))
    assert attrs["driver.virt.network.default.state"] == "active"
    assert attrs["driver.virt.network.default.bridge_name"] == MISSING
    # The managed bridge listed again is not published a second time, by its own name.
    assert f"driver.virt.network.{MISSING}.state" not in attrs
    assert attrs["driver.virt.network.lo.state"] == "active"


def fake_fingerprint(*emulators: Emulator) -> Fingerprint:
    facts: dict[str, str | bool] = {"kvm": False, "jail.mode": "userns", "jail.available": True}
    attributes: dict[str, str | bool] = {"driver.qemu": True, "driver.qemu.version": "9.1.0",
                                         **{f"driver.qemu.{k}": v for k, v in facts.items()}}
    return Fingerprint(emulators, KvmVerdict(False, "test"), attributes, facts)


def test_virt_attributes_from_the_fingerprint_host_config_and_counts(tmp_path: Path) -> None:
    # The host architecture's emulator gives the version (libvirt's hypervisor's).
    fp = fake_fingerprint(Emulator("aarch64", Path("/a"), "9.1.0"),
                          Emulator(platform.machine(), Path("/b"), "8.2.2"))
    host = HostConfig(state_dir=tmp_path, storage_pools=POOLS, allowed_bridges=("lo",))
    attrs = virt_attributes(fp, check_host(host), running=2, exited=1)
    assert attrs["driver.virt"] is True
    assert attrs["driver.virt.emulator.version"] == 8_002_002
    assert (attrs["driver.virt.active"], attrs["driver.virt.inactive"]) == (2, 1)
    # vmdriver's own facts, under the virt prefix.
    assert attrs["driver.virt.kvm"] is False and attrs["driver.virt.jail.mode"] == "userns"
    assert attrs["driver.virt.storage_pool.remote.default"] is True
    assert attrs["driver.virt.network.lo.state"] == "active"
    assert "driver.virt.libvirt.version" not in attrs  # there is no libvirt
    assert not [k for k in attrs if not k.startswith("driver.virt")]


def test_no_pool_block_publishes_the_default_pool(tmp_path: Path) -> None:
    fp = fake_fingerprint(Emulator("x86_64", Path("/b"), "7.2.0"))
    attrs = virt_attributes(fp, check_host(HostConfig(state_dir=tmp_path)), 0, 0)
    assert attrs["driver.virt.storage_pool.default"] == "directory"
    assert attrs["driver.virt.storage_pool.default.default"] is True


def test_nothing_without_an_emulator(tmp_path: Path) -> None:
    fp = Fingerprint((), KvmVerdict(False, "none"))
    assert virt_attributes(fp, check_host(HostConfig(state_dir=tmp_path)), 0, 0) == {}


@dataclass
class _Info:
    result: Any


class _Supervisor:
    """The one call ``counts`` makes: the VM's result (None while it runs)."""

    def __init__(self, results: dict[str, Any]) -> None:
        self.results = results

    def info(self, vm_id: str) -> _Info:
        if vm_id not in self.results:
            raise TaskNotFound(vm_id)
        return _Info(self.results[vm_id])


@pytest.mark.parametrize(("results", "expected"), [
    ({}, (0, 0)),
    ({"a": None, "b": None, "c": "exited"}, (2, 1)),
])
def test_task_counts_running_and_exited(results: dict[str, Any],
                                        expected: tuple[int, int]) -> None:
    table = TaskTable(_Supervisor(results), EventHub())  # type: ignore[arg-type]
    for task_id in [*results, "gone"]:  # "gone": dropped by the supervisor mid-destroy
        table._tasks[task_id] = Task(task_id, "alloc", task_id)
    assert asyncio.run(table.counts()) == expected
