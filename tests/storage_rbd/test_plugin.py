"""A ceph pool through the Nomad plugin installed as ``virt``: the agent's block, StartTask, DestroyTask.

The agent's ``storage_pools { ceph "remote" { ... } }`` arrives as hcldec decodes it.
Nomad keeps a task's handle in its client state, so the key must not be in it;
a StartTask whose monitors cannot be reached must fail, not hang.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from tests.ceph.cluster import Cluster, free_port
from tests.conftest import qemu_processes, short_tmp
from tests.nomad.conftest import Alloc
from tests.nomad.nomadsim import Plugin, install_launcher, status_details
from tests.storage_rbd.conftest import pool_state
from tests.virt.test_plugin import disk, virt_task
from vmdriver.nomad.proto import driver_pb2 as pb

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture
def place() -> Iterator[Path]:
    with short_tmp("vrp-", kill_qemus=True) as path:
        yield path


def start_plugin(place: Path, guest: Path, cl: Cluster, mon: str = "") -> Plugin:
    """The plugin as ``virt`` with one ceph pool, configured as the agent does."""
    plugin = Plugin([str(install_launcher(place / "plugins", "virt"))])
    ceph = {"remote": {"pool": cl.pool, "hosts": [mon or cl.mon_host],
                       "authentication": {"username": cl.client, "secret": cl.client_key}}}
    plugin.configure({
        "state_dir": str(place / "state"), "image_paths": [str(guest)],
        "virt_accelerator": "tcg",
        "storage_pools": {"default": None, "directory": {}, "ceph": ceph},
        "provider": {}, "network": {},
    })
    return plugin


def test_start_and_destroy_through_the_plugin_key_not_in_the_handle(
        place: Path, guest_dir: Path, ceph_cluster: Cluster, admin: Any) -> None:
    before = pool_state(admin, ceph_cluster.pool)
    plugin = start_plugin(place, guest_dir, ceph_cluster)
    alloc = Alloc(place / "alloc")
    try:
        task, _ = virt_task(alloc, {"disk": [disk(str(guest_dir / "disk.raw"), chained=True,
                                                  primary=True), disk(size="16MiB")]})
        resp = plugin.driver.StartTask(pb.StartTaskRequest(task=task), timeout=120)
        assert ceph_cluster.client_key.encode() not in resp.handle.SerializeToString()
        made = sorted(set(pool_state(admin, ceph_cluster.pool)) - set(before))
        assert [n.split("-", 1)[1] for n in made if not n.startswith("base-")] == ["vm-0", "vm-1"]
        plugin.driver.StopTask(pb.StopTaskRequest(
            task_id=task.id, timeout=duration_pb2.Duration(seconds=5), signal="SIGINT"),
            timeout=60)
        plugin.driver.DestroyTask(pb.DestroyTaskRequest(task_id=task.id, force=True), timeout=90)
        assert pool_state(admin, ceph_cluster.pool) == before
    finally:
        alloc.close()
        plugin.close()


def test_start_with_unreachable_monitors_fails_fast(place: Path, guest_dir: Path,
                                                    ceph_cluster: Cluster) -> None:
    mon = f"127.0.0.1:{free_port()}"
    plugin = start_plugin(place, guest_dir, ceph_cluster, mon=mon)
    alloc = Alloc(place / "alloc")
    try:
        task, _ = virt_task(alloc, {"disk": [disk(size="16MiB")]})
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as exc:
            plugin.driver.StartTask(pb.StartTaskRequest(task=task), timeout=60)
        assert time.monotonic() - t0 < 30
        message, _ = status_details(exc.value)
        assert "no Ceph monitor reachable" in message and mon in message, message
        assert ceph_cluster.client_key not in message
        assert not qemu_processes(str(place))
    finally:
        alloc.close()
        plugin.close()
