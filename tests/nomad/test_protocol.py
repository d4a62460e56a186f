"""The plugin process as Nomad's client sees it: handshake, base calls, errors. No guest boots."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2

from tests.nomad.conftest import PLUGIN_ARGV, Alloc
from tests.nomad.nomadsim import Plugin, install_launcher, status_details, stream_first
from vmdriver.nomad.proto import base_pb2, health_pb2, plugin_pb2
from vmdriver.nomad.proto import driver_pb2 as pb
from vmdriver.runtime.taskdir import TaskDir, VMDirs


def test_refuses_to_run_by_hand() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NOMAD_PLUGIN_MAGIC_COOKIE"}
    proc = subprocess.run(PLUGIN_ARGV, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 1
    assert proc.stdout == ""  # no handshake, nothing for a host to misread
    assert "Nomad task driver plugin" in proc.stderr and "vmdriver run" in proc.stderr


def test_handshake_and_base_plugin(start_plugin: Callable[..., Plugin], tmp_path: Path) -> None:
    # Installed under the name of Nomad's built-in driver, it reports that name.
    plugin = start_plugin([str(install_launcher(tmp_path / "plugins", "qemu"))], configure=False)
    hs = plugin.handshake
    assert (hs.core, hs.app, hs.network, hs.protocol, hs.cert) == ("1", "2", "unix", "grpc", "")
    assert Path(hs.address).is_absolute() and Path(hs.address).is_socket()
    assert oct(Path(hs.address).parent.stat().st_mode & 0o777) == "0o700"  # a private dir
    info = plugin.base.PluginInfo(base_pb2.PluginInfoRequest(), timeout=5)
    assert info.type == base_pb2.DRIVER and list(info.plugin_api_versions) == ["v0.1.0"]
    assert info.name == "qemu" and info.plugin_version.count(".") == 2
    check = plugin.health.Check(health_pb2.HealthCheckRequest(service="plugin"), timeout=5)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    schema = plugin.base.ConfigSchema(base_pb2.ConfigSchemaRequest(), timeout=5).spec
    assert schema.object.attributes["image_paths"].Attr.type == "list(string)"
    # Phase B of the agent's start: SetConfig twice on one instance.
    plugin.configure({"state_dir": str(tmp_path / "state")})
    plugin.configure({"state_dir": str(tmp_path / "state")})

    # StreamStdio stays open (no "stdio service not available" warning in Nomad).
    stdio = plugin.stdio.StreamStdio(empty_pb2.Empty())
    time.sleep(0.3)
    assert stdio.running()
    stdio.cancel()

    t0 = time.monotonic()
    fp = stream_first(plugin.driver.Fingerprint(pb.FingerprintRequest()), 30)
    assert time.monotonic() - t0 < 30
    assert fp.health == pb.FingerprintResponse.HEALTHY, fp.health_description
    assert fp.attributes["driver.qemu"].bool_val is True
    assert fp.attributes["driver.qemu.version"].string_val.startswith("7.")
    assert "x86_64" in fp.attributes["driver.qemu.emulators"].string_val.split(",")
    assert fp.attributes["driver.qemu.kvm"].WhichOneof("value") == "bool_val"

    # Controller.Shutdown: the process exits quickly (before go-plugin's 2 s SIGKILL).
    t0 = time.monotonic()
    plugin.controller.Shutdown(plugin_pb2.Empty(), timeout=2)
    assert plugin.proc.wait(2) == 0 and time.monotonic() - t0 < 2
    assert plugin.extra_stdout == []  # nothing but the handshake ever reached stdout
    assert not Path(hs.address).exists()
    assert all(line.startswith("{") for line in plugin.stderr_lines)  # hclog JSON


def test_bad_host_config_is_a_readable_error(start_plugin: Callable[..., Plugin]) -> None:
    plugin = start_plugin(configure=False)
    with pytest.raises(grpc.RpcError) as err:
        plugin.configure({"sandbox": "maybe"})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    msg, _ = status_details(err.value)
    assert msg.startswith('plugin "vmdriver" config: sandbox:') and "maybe" in msg
    with pytest.raises(grpc.RpcError) as err:
        plugin.configure({"image_pathz": ["/srv"]})
    msg, _ = status_details(err.value)
    assert "image_pathz: unknown field" in msg and "image_paths" in msg
    # The plugin survives bad input and still answers.
    assert plugin.base.PluginInfo(base_pb2.PluginInfoRequest(), timeout=5).name == "vmdriver"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"accelerator": "tcg"}, "vm.config.image_path: image_path must be set"),
        ({"image_path": "local/d.img", "bogus": 1}, "vm.config.bogus: unknown config key"),
        ({"image_path": "local/d.img", "accelerator": "xen"}, "vm.config.accelerator"),
        # The image is the task's first drive (image0); the error names the task and the path.
        ({"image_path": "local/missing.qcow2"},
         "vm: config.image_path: image file does not exist (got 'local/missing.qcow2')"),
        ({"image_path": "/etc/passwd"}, "outside the allowed dirs"),
        ({"image_path": "local/d.img", "port_map": [{"web": 80}]}, "port_map label 'web'"),
        ({"image_path": "local/d.img", "args": ["-monitor", "stdio"], "emulator": "sparc99"}, "emulator"),
    ],
)
def test_bad_task_config_is_a_readable_error(start_plugin: Callable[..., Plugin], alloc: Alloc,
                                             state_dir: Path, config: dict[str, object],
                                             expected: str) -> None:
    plugin = start_plugin()
    (alloc.root / "vm" / "local").mkdir(parents=True, exist_ok=True)
    (alloc.root / "vm" / "local" / "d.img").write_bytes(b"\0" * 65536)
    task, _ = alloc.task("vm", config)
    with pytest.raises(grpc.RpcError) as err:
        plugin.driver.StartTask(pb.StartTaskRequest(task=task), timeout=30)
    msg, recoverable = status_details(err.value)
    assert expected in msg, msg
    assert "Traceback" not in msg and "\n" not in msg
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                grpc.StatusCode.FAILED_PRECONDITION)
    assert recoverable is not True  # Nomad must not retry a bad config
    # Nothing was left behind, and the task is unknown.
    with pytest.raises(grpc.RpcError) as err:
        plugin.driver.WaitTask(pb.WaitTaskRequest(task_id=task.id), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # The control plane (QMP socket, record) would be in the runtime dir: none is left.
    assert not list(state_dir.rglob("*.sock")) and not list(alloc.root.rglob("*.sock"))
    runtime = VMDirs.under(state_dir, task.id, TaskDir(alloc.root, "vm")).runtime
    assert not runtime.exists(), f"runtime dir left behind by a failed start: {runtime}"


def test_unknown_tasks(start_plugin: Callable[..., Plugin]) -> None:
    plugin = start_plugin()
    # Stop/Destroy of a task the plugin does not know succeed (Nomad retries errors 5 times).
    plugin.driver.StopTask(pb.StopTaskRequest(task_id="a/b/c"), timeout=5)
    plugin.driver.DestroyTask(pb.DestroyTaskRequest(task_id="a/b/c", force=True), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        plugin.driver.InspectTask(pb.InspectTaskRequest(task_id="a/b/c"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "a/b/c" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        plugin.driver.SignalTask(pb.SignalTaskRequest(task_id="a/b/c", signal="SIGHUP"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # signals are supported (tests/guest)
    with pytest.raises(grpc.RpcError) as err:
        plugin.driver.ExecTask(pb.ExecTaskRequest(task_id="a/b/c", command=["true"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    bad = pb.TaskHandle(version=1, config=pb.TaskConfig(id="x/y/z"), driver_state=b"{not json")
    with pytest.raises(grpc.RpcError) as err:
        plugin.driver.RecoverTask(pb.RecoverTaskRequest(handle=bad), timeout=5)
    assert "driver_state is not vmdriver's" in err.value.details()


def test_start_fails_recoverably_without_a_log_reader(start_plugin: Callable[..., Plugin],
                                                       alloc: Alloc) -> None:
    plugin = start_plugin()
    (alloc.root / "vm" / "local").mkdir(parents=True)
    (alloc.root / "vm" / "local" / "d.img").write_bytes(b"\0" * 65536)
    task, out = alloc.task("vm", {"image_path": "local/d.img"})
    out.close()  # logmon is gone: opening the FIFO for writing would block forever
    with pytest.raises(grpc.RpcError) as err:
        plugin.driver.StartTask(pb.StartTaskRequest(task=task), timeout=30)
    msg, recoverable = status_details(err.value)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert recoverable is True and "log FIFO" in msg


def test_plugin_process_survives_cancelled_calls(start_plugin: Callable[..., Plugin]) -> None:
    plugin = start_plugin()
    events = plugin.driver.TaskEvents(pb.TaskEventsRequest())
    fp = plugin.driver.Fingerprint(pb.FingerprintRequest())
    stream_first(fp, 30)
    fp.cancel()
    events.cancel()
    assert plugin.proc.poll() is None
    assert plugin.base.PluginInfo(base_pb2.PluginInfoRequest(), timeout=5).name == "vmdriver"
    assert sys.executable  # the plugin ran under this interpreter


def test_destroy_with_force_kills_a_running_vm(start_plugin: Callable[..., Plugin], alloc: Alloc,
                                               no_leaks: None) -> None:
    # A VM with no guest OS (blank disk, -nodefaults) is enough: no boot needed.
    plugin = start_plugin()
    (alloc.root / "vm" / "local").mkdir(parents=True)
    (alloc.root / "vm" / "local" / "blank.img").write_bytes(b"\0" * 1048576)
    task, _ = alloc.task("vm", {"image_path": "local/blank.img", "args": ["-nodefaults"]})
    plugin.driver.StartTask(pb.StartTaskRequest(task=task), timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        plugin.driver.DestroyTask(pb.DestroyTaskRequest(task_id=task.id, force=False), timeout=10)
    assert "still running" in err.value.details()
    waiting = plugin.driver.WaitTask.future(pb.WaitTaskRequest(task_id=task.id), timeout=30)
    plugin.driver.DestroyTask(pb.DestroyTaskRequest(task_id=task.id, force=True), timeout=20)
    result = waiting.result().result
    assert (result.exit_code, result.signal, result.oom_killed) == (137, 9, False)
