"""The plugin installed as ``virt``: nomad-driver-virt's agent config and task, over gRPC.

Nomad runs the executable named ``virt`` from its plugin dir; the driver name
and the task dialect come from that name. The agent's ``storage_pools`` block
arrives as hcldec makes it (nil for every unset attribute, a map per label).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from tests.conftest import READY, qemu_processes, short_tmp
from tests.nomad.conftest import Alloc
from tests.nomad.nomadsim import Plugin, cty_msgpack, install_launcher, status_details
from tests.virt.helpers import bases, volumes
from vmdriver.jobfile.dialects import DIALECTS
from vmdriver.nomad.hclspec import task_config_spec
from vmdriver.nomad.proto import driver_pb2 as pb

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

DISK_ATTRS = ("size", "sparse", "format", "bus_type", "devname", "kind", "read_only", "pool",
              "primary", "chained", "driver", "volume")


def disk(source: str | None = None, **attrs: Any) -> dict[str, Any]:
    """A disk block as hcldec decodes it: every attribute present, nil when unset."""
    body: dict[str, Any] = dict.fromkeys(DISK_ATTRS)
    body.update(attrs)
    body["source"] = None if source is None else {"image": source, "volume": None, "format": None}
    return body


@pytest.fixture
def place() -> Iterator[Path]:
    with short_tmp("vtp-", kill_qemus=True) as path:
        yield path


@pytest.fixture
def plugin(place: Path, guest_dir: Path) -> Iterator[Plugin]:
    launcher = install_launcher(place / "plugins", "virt")
    p = Plugin([str(launcher)])
    try:
        p.configure({
            "state_dir": str(place / "state"), "image_paths": [str(guest_dir)],
            "virt_accelerator": "tcg",
            "storage_pools": {"default": None, "ceph": {},
                              "directory": {"local": {"path": str(place / "pool")}}},
            "provider": {}, "network": {},
        })
        yield p
    finally:
        p.close()


def virt_task(alloc: Alloc, config: dict[str, Any]) -> tuple[pb.TaskConfig, Any]:
    task, console = alloc.task("vm", {}, memory_mb=256)
    task.msgpack_driver_config = cty_msgpack(config, task_config_spec(DIALECTS["virt"]))
    return task, console


def test_plugin_named_virt_runs_a_virt_task_and_destroy_removes_its_volumes(
        plugin: Plugin, place: Path, guest_dir: Path) -> None:
    info = plugin.base.PluginInfo(__import__("vmdriver.nomad.proto.base_pb2",
                                             fromlist=["x"]).PluginInfoRequest(), timeout=5)
    assert info.name == "virt"
    schema = plugin.driver.TaskConfigSchema(pb.TaskConfigSchemaRequest(), timeout=5).spec
    assert schema.object.attributes["disk"].block_list.name == "disk"
    alloc = Alloc(place / "alloc")
    try:
        task, console = virt_task(alloc, {
            "disk": [disk(str(guest_dir / "disk.qcow2"), chained=True, primary=True),
                     disk(size="64MiB")],
            "os": None, "network_interface": [], "cmds": None,
            "default_user_password": "plain-Secret-1",
        })
        pool = place / "pool"
        resp = plugin.driver.StartTask(pb.StartTaskRequest(task=task), timeout=60)
        # Nomad keeps the handle in its client state: the password is not in it.
        assert resp.handle.driver_state and resp.handle.config.id == task.id
        assert b"plain-Secret-1" not in resp.handle.SerializeToString()
        names = volumes(pool)
        assert [n.split("-", 1)[1] for n in names] == ["vm-0.qcow2", "vm-1.qcow2"]
        assert names[0].startswith(alloc.id[:8])
        assert len(bases(pool)) == 1
        console.wait_for(READY, 240)  # the guest booted from its pool volume
        plugin.driver.StopTask(pb.StopTaskRequest(
            task_id=task.id, timeout=duration_pb2.Duration(seconds=20), signal="SIGINT"),
            timeout=60)
        assert volumes(pool) == names  # a stopped task keeps its disks until DestroyTask
        plugin.driver.DestroyTask(pb.DestroyTaskRequest(task_id=task.id, force=True), timeout=30)
        assert volumes(pool) == [] and bases(pool) == []
    finally:
        alloc.close()


def test_failed_start_through_the_plugin_leaves_no_volume(plugin: Plugin, place: Path,
                                                         guest_dir: Path) -> None:
    alloc = Alloc(place / "alloc")
    try:
        # Volumes are made, then the launch fails: no such emulator on this host.
        task, _ = virt_task(alloc, {"disk": [disk(str(guest_dir / "disk.qcow2"))],
                                    "os": {"arch": "sparc64", "machine": "virt"}})
        with pytest.raises(grpc.RpcError) as exc:
            plugin.driver.StartTask(pb.StartTaskRequest(task=task), timeout=60)
        message, _ = status_details(exc.value)
        assert "sparc64" in message
        assert volumes(place / "pool") == [] and bases(place / "pool") == []
        assert not qemu_processes(str(place))
    finally:
        alloc.close()
