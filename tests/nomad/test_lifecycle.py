"""StartTask → WaitTask → TaskStats → StopTask → DestroyTask against the test guest, over gRPC."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from google.protobuf import duration_pb2

from tests.conftest import READY
from tests.e2e.cgroups import cpu_weight, memory_limit
from tests.nomad.conftest import Alloc
from tests.nomad.nomadsim import Plugin, stream_first
from vmdriver.nomad.proto import driver_pb2 as pb
from vmdriver.runtime import cgroup
from vmdriver.runtime.record import VMRecord

pytestmark = pytest.mark.e2e

BOOT_TIMEOUT = 90


def guest_config(alloc: Alloc, guest_dir: Path, task: str = "vm") -> dict[str, object]:
    """The qemu task config of the test guest (TCG, ACPI shutdown), its disk in local/.

    The disk is copied as an artifact would be: every VM writes its own.
    """
    local = alloc.root / task / "local"
    local.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(guest_dir / "disk.qcow2", local / "disk.qcow2")
    return {"image_path": "local/disk.qcow2", "accelerator": "tcg", "graceful_shutdown": True}


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie awaiting a reaper counts: QEMU outlived its parent)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Waiter(threading.Thread):
    """A WaitTask call blocking in the background, as the task runner keeps one."""

    def __init__(self, plugin: Plugin, task_id: str) -> None:
        super().__init__(daemon=True)
        self.plugin, self.task_id = plugin, task_id
        self.response: pb.WaitTaskResponse | None = None
        self.start()

    def run(self) -> None:
        self.response = self.plugin.driver.WaitTask(pb.WaitTaskRequest(task_id=self.task_id), timeout=120)

    def result(self, timeout: float) -> pb.WaitTaskResponse:
        self.join(timeout)
        assert self.response is not None, "WaitTask did not return"
        return self.response


def check_record(handle: pb.TaskHandle, task_id: str, pid: int, state_dir: Path) -> VMRecord:
    """driver_state is the VM record: what a new plugin process needs to re-attach, with
    the control plane in the runtime dir under the plugin's state dir, not the task dir."""
    record = VMRecord.model_validate(json.loads(handle.driver_state)["record"])
    # In a jail, ``pid`` is the jail's monitor (what re-attaching watches), QEMU its child.
    assert record.id == task_id and (record.qemu_pid or record.pid) == pid
    # QEMU's sockets sit in the one dir of the runtime dir it may write; the record does not.
    assert Path(record.qmp_socket).parent == Path(record.runtime_dir) / "vm"
    assert Path(record.runtime_dir).parent == state_dir / "run"
    assert Path(record.qmp_socket).is_socket()
    return record


def check_confinement(pid: int, scope: str) -> tuple[Path, Path]:
    """The task's resources confine QEMU (memory limit with headroom, CPU weight), read
    from the files of its cgroup under whatever hierarchy this host has."""
    mem_group, limit = memory_limit(pid)
    assert (mem_group.parent.name, mem_group.name) == ("nomad", scope), mem_group
    assert limit == cgroup.memory_limit_mib(256, 1, "tcg", 256) << 20
    cpu_group, weight, expected = cpu_weight(pid, 700)
    assert cpu_group.name == scope and weight == expected, (cpu_group, weight)
    return mem_group, cpu_group


def check_stats(plugin: Plugin, task_id: str) -> None:
    """TaskStats streams timestamped samples with memory and CPU usage."""
    stats = plugin.driver.TaskStats(
        pb.TaskStatsRequest(task_id=task_id, collection_interval=duration_pb2.Duration(nanos=200_000_000))
    )
    samples = [next(stats) for _ in range(3)]
    stats.cancel()
    last = samples[-1].stats
    assert last.HasField("timestamp") and last.HasField("agg_resource_usage")
    assert last.agg_resource_usage.memory.rss > 10 << 20
    assert last.timestamp.ToNanoseconds() > samples[0].stats.timestamp.ToNanoseconds()
    cpu = last.agg_resource_usage.cpu
    assert cpu.percent == pytest.approx(cpu.user_mode + cpu.system_mode)
    assert pb.CPUUsage.PERCENT in cpu.measured_fields


def test_task_lifecycle(start_plugin: Callable[..., Plugin], alloc: Alloc, guest_dir: Path,
                        state_dir: Path, no_leaks: None) -> None:
    plugin = start_plugin()
    events = plugin.driver.TaskEvents(pb.TaskEventsRequest())
    schema = plugin.driver.TaskConfigSchema(pb.TaskConfigSchemaRequest(), timeout=5)
    assert "image_path" in schema.spec.object.attributes
    caps = plugin.driver.Capabilities(pb.CapabilitiesRequest(), timeout=5).capabilities
    assert caps.send_signals and caps.exec  # through the guest agent (tests/guest)

    task, console = alloc.task("vm", guest_config(alloc, guest_dir), memory_mb=256, cpu_shares=700)
    resp = plugin.driver.StartTask(pb.StartTaskRequest(task=task), timeout=60)
    handle = resp.handle
    assert handle.version >= 1 and handle.state == pb.RUNNING
    assert handle.config.id == task.id and handle.driver_state
    console.wait_for(READY, BOOT_TIMEOUT)  # the serial console reaches Nomad's stdout FIFO

    inspect = plugin.driver.InspectTask(pb.InspectTaskRequest(task_id=task.id), timeout=5)
    assert inspect.task.state == pb.RUNNING and inspect.task.HasField("started_at")
    pid = int(inspect.driver.attributes["pid"])
    assert psutil.Process(pid).name().startswith("qemu-system")

    record = check_record(handle, task.id, pid, state_dir)
    mem_group, cpu_group = check_confinement(pid, f"{alloc.id}.vm")
    check_stats(plugin, task.id)

    waiter = Waiter(plugin, task.id)
    time.sleep(0.5)
    assert waiter.response is None  # WaitTask blocks while the VM runs
    t0 = time.monotonic()
    plugin.driver.StopTask(
        pb.StopTaskRequest(task_id=task.id, timeout=duration_pb2.Duration(seconds=30), signal="SIGINT"),
        timeout=60,
    )
    result = waiter.result(30)
    assert result.result.exit_code == 0 and result.result.signal == 0, result
    assert not result.err  # the guest powered off on the ACPI button: a clean stop
    assert time.monotonic() - t0 < 30
    assert gone(pid)
    assert not mem_group.exists() and not cpu_group.exists()  # cleaned up
    assert not Path(record.runtime_dir).exists()

    # WaitTask after the end answers at once with the same result.
    again = plugin.driver.WaitTask(pb.WaitTaskRequest(task_id=task.id), timeout=5)
    assert again.result == result.result
    plugin.driver.DestroyTask(pb.DestroyTaskRequest(task_id=task.id, force=True), timeout=10)
    plugin.driver.DestroyTask(pb.DestroyTaskRequest(task_id=task.id, force=True), timeout=10)

    messages = [stream_first(events, 5).message for _ in range(3)]
    events.cancel()
    assert messages[0].startswith("VM started (pid"), messages
    assert messages[1].startswith("stopping the VM"), messages
    assert messages[2].startswith("VM exited"), messages


def test_vm_survives_plugin_kill_and_shutdown(start_plugin: Callable[..., Plugin], alloc: Alloc,
                                              guest_dir: Path, no_leaks: None) -> None:
    first = start_plugin()
    task, console = alloc.task("vm", guest_config(alloc, guest_dir))
    handle = first.driver.StartTask(pb.StartTaskRequest(task=task), timeout=60).handle
    console.wait_for(READY, BOOT_TIMEOUT)
    pid = int(first.driver.InspectTask(pb.InspectTaskRequest(task_id=task.id),
                                       timeout=5).driver.attributes["pid"])
    started = psutil.Process(pid).create_time()

    first.kill9()  # the plugin dies; the VM must not
    assert psutil.Process(pid).create_time() == started

    # Nomad re-dispenses and sends the handle it kept. Only handle.config.id is set.
    second = start_plugin()
    second.driver.RecoverTask(pb.RecoverTaskRequest(handle=handle), timeout=30)
    second.driver.RecoverTask(pb.RecoverTaskRequest(handle=handle), timeout=30)  # idempotent
    inspect = second.driver.InspectTask(pb.InspectTaskRequest(task_id=task.id), timeout=5)
    assert int(inspect.driver.attributes["pid"]) == pid
    assert psutil.Process(pid).create_time() == started  # re-attached, not restarted

    # The agent shuts down gracefully: Driver.Shutdown, then Controller.Shutdown.
    second.driver.Shutdown(pb.ShutdownRequest(), timeout=3)
    second.close()
    assert second.proc.returncode == 0
    assert psutil.Process(pid).create_time() == started

    # After an agent restart the handle comes from the state DB without the msgpack config.
    stored = pb.TaskHandle()
    stored.CopyFrom(handle)
    stored.config.msgpack_driver_config = b""
    third = start_plugin()
    third.driver.RecoverTask(pb.RecoverTaskRequest(handle=stored), timeout=30)
    waiter = Waiter(third, task.id)
    third.driver.StopTask(
        pb.StopTaskRequest(task_id=task.id, timeout=duration_pb2.Duration(seconds=30)), timeout=60
    )
    result = waiter.result(30)
    # The real end of the VM: the guest powered off on ACPI, QEMU exited 0.
    assert result.result.exit_code == 0 and not result.err, result
    assert gone(pid)
    third.driver.DestroyTask(pb.DestroyTaskRequest(task_id=task.id, force=True), timeout=10)
    assert os.path.exists(alloc.root / "alloc" / "logs" / "vm.stdout.0")
