"""Into the guest through the plugin, as Nomad's client calls it: exec, signals, stats, events, metrics.

One plugin process and one booted test guest (agent, balloon, a user-mode NIC)
serve the whole module; what the guest sees is read from inside it (its
/proc/meminfo, its process list) and what the host sees from /proc.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import grpc
import psutil
import pytest
from google.protobuf import duration_pb2
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import READY, qemu_processes
from tests.nomad.conftest import PLUGIN_ARGV, Alloc
from tests.nomad.nomadsim import Plugin
from vmdriver.nomad.proto import driver_pb2 as pb

pytestmark = pytest.mark.e2e
BOOT_TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Events(threading.Thread):
    """TaskEvents read in the background, as Nomad's client keeps the stream open."""

    def __init__(self, plugin: Plugin) -> None:
        super().__init__(daemon=True)
        self.stream = plugin.driver.TaskEvents(pb.TaskEventsRequest())
        self.seen: list[pb.DriverTaskEvent] = []
        self.start()

    def run(self) -> None:
        try:
            for ev in self.stream:
                self.seen.append(ev)
        except grpc.RpcError:
            pass

    def wait_for(self, prefix: str, timeout: float) -> pb.DriverTaskEvent:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in list(self.seen):
                if ev.message.startswith(prefix):
                    return ev
            time.sleep(0.1)
        raise AssertionError(f"no event {prefix!r}: {[e.message for e in self.seen]}")


class Booted:
    """The module's plugin, its booted task, and what the test reads from them."""

    def __init__(self, plugin: Plugin, task: pb.TaskConfig, metrics: str, events: Events,
                 alloc: Alloc) -> None:
        self.plugin, self.task, self.metrics, self.events, self.alloc = (plugin, task, metrics,
                                                                          events, alloc)

    def exec(self, *argv: str, timeout: float = 30) -> pb.ExecTaskResponse:
        got: pb.ExecTaskResponse = self.plugin.driver.ExecTask(pb.ExecTaskRequest(
            task_id=self.task.id, command=list(argv),
            timeout=duration_pb2.Duration(seconds=int(timeout))), timeout=timeout + 30)
        return got


def qemu_config(alloc: Alloc, guest_dir: Path, name: str, **extra: Any) -> dict[str, Any]:
    local = alloc.root / name / "local"
    local.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(guest_dir / "disk.qcow2", local / "disk.qcow2")
    return {"image_path": "local/disk.qcow2", "accelerator": "tcg", "graceful_shutdown": True,
            "drive_interface": "virtio", **extra}


@pytest.fixture(scope="module")
def booted(guest_dir: Path) -> Iterator[Booted]:
    state_dir = Path(tempfile.mkdtemp(prefix="vmg-", dir="/tmp"))
    alloc = Alloc(Path(tempfile.mkdtemp(prefix="nag-", dir="/tmp")))
    metrics = f"127.0.0.1:{free_port()}"
    plugin = Plugin(PLUGIN_ARGV)
    try:
        plugin.configure({"state_dir": str(state_dir), "metrics_address": metrics})
        plugin.driver.Init(pb.InitRequest(), timeout=10)
        events = Events(plugin)
        cfg = qemu_config(alloc, guest_dir, "vm", guest_agent=True, balloon=True, ports=["http"])
        task, console = alloc.task("vm", cfg, memory_mb=256, ports=(("http", free_port(), 8080),))
        plugin.driver.StartTask(pb.StartTaskRequest(task=task), timeout=60)
        console.wait_for(READY, BOOT_TIMEOUT)
        events.wait_for("guest agent connected", 30)
        yield Booted(plugin, task, metrics, events, alloc)
        with pytest.raises(grpc.RpcError):  # the last test shut the guest down already
            plugin.driver.ExecTask(pb.ExecTaskRequest(task_id=task.id, command=["true"]), timeout=5)
    finally:
        plugin.close()
        alloc.close()
        leaked = qemu_processes(str(state_dir))  # its sockets are in the runtime dir there
        for pid in leaked:  # a failed test must not leave a VM running for the next ones
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        shutil.rmtree(alloc.root, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)
    assert not leaked, f"QEMU processes left behind: {sorted(leaked)}"


def test_capabilities_say_exec_and_signals(booted: Booted) -> None:
    caps = booted.plugin.driver.Capabilities(pb.CapabilitiesRequest(), timeout=5).capabilities
    assert caps.exec and caps.send_signals


def _stream(booted: Booted, argv: list[str], stdin: list[bytes], *, tty: bool = False,
            ) -> list[tuple[float, pb.ExecTaskStreamingResponse]]:
    """ExecTaskStreaming as `nomad alloc exec -i -t=false` drives it; each answer with its time."""
    def requests() -> Iterator[pb.ExecTaskStreamingRequest]:
        yield pb.ExecTaskStreamingRequest(setup=pb.ExecTaskStreamingRequest.Setup(
            task_id=booted.task.id, command=argv, tty=tty))
        for data in stdin:
            time.sleep(0.3)
            yield pb.ExecTaskStreamingRequest(stdin=pb.ExecTaskStreamingIOOperation(data=data))
        yield pb.ExecTaskStreamingRequest(stdin=pb.ExecTaskStreamingIOOperation(close=True))

    out = []
    for msg in booted.plugin.driver.ExecTaskStreaming(requests(), timeout=180):
        out.append((time.monotonic(), msg))
    return out


def _joined(msgs: list[tuple[float, pb.ExecTaskStreamingResponse]],
            which: Literal["stdout", "stderr"]) -> bytes:
    return b"".join(getattr(m, which).data for _, m in msgs if m.HasField(which))


def test_exec_streaming_stdin_stdout_stderr_and_exit_code(booted: Booted) -> None:
    script = 'while read -r l; do echo "got $l"; echo "e:$l" >&2; done; echo "env=$HOME"; exit 3'
    msgs = _stream(booted, ["/bin/sh", "-c", script], [b"hello\n", b"world\n"])
    assert _joined(msgs, "stdout").startswith(b"got hello\ngot world\nenv=")
    assert _joined(msgs, "stderr") == b"e:hello\ne:world\n"
    last = msgs[-1][1]
    assert last.exited and last.result.exit_code == 3
    closes = [m for _, m in msgs if (m.HasField("stdout") and m.stdout.close)
              or (m.HasField("stderr") and m.stderr.close)]
    assert len(closes) == 2  # both streams closed before the end, as Nomad expects


def test_exec_streams_output_before_the_command_ends(booted: Booted) -> None:
    msgs = _stream(booted, ["/bin/sh", "-c", "for i in 1 2 3; do echo tick $i; sleep 1; done"], [])
    ticks = [(t, m.stdout.data) for t, m in msgs if m.HasField("stdout") and m.stdout.data]
    end = msgs[-1][0]
    assert b"".join(d for _, d in ticks) == b"tick 1\ntick 2\ntick 3\n"
    # "tick 1" arrived while the command still had ~2 s of sleeping to do.
    assert end - ticks[0][0] > 1.5, [(round(end - t, 2), d) for t, d in ticks]


def test_exec_refuses_a_tty(booted: Booted) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _stream(booted, ["/bin/sh"], [], tty=True)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no TTY over the guest agent" in str(err.value.details())


def test_exec_task_output_exit_code_and_missing_command(booted: Booted) -> None:
    got = booted.exec("/bin/sh", "-c", "echo out; echo err >&2; exit 7")
    assert (got.stdout, got.stderr, got.result.exit_code) == (b"out\n", b"err\n", 7)
    missing = booted.exec("no-such-command")
    assert missing.result.exit_code == 127 and b"no-such-command" in missing.stderr


def test_exec_timeout_kills_the_command(booted: Booted) -> None:
    t0 = time.monotonic()
    got = booted.exec("/bin/sh", "-c", "echo started; sleep 300", timeout=2)
    assert time.monotonic() - t0 < 15
    assert got.result.exit_code == 124 and got.stdout == b"started\n"
    assert b"longer than 2s and was killed" in got.stderr
    ps = booted.exec("/bin/ps").stdout.decode()
    assert "sleep 300" not in ps, ps  # the whole session went, not just the shell


def test_stats_carry_the_guests_own_memory(booted: Booted) -> None:
    stats = booted.plugin.driver.TaskStats(pb.TaskStatsRequest(
        task_id=booted.task.id, collection_interval=duration_pb2.Duration(nanos=500_000_000)))
    deadline = time.monotonic() + 30
    sample = None
    for msg in stats:
        if "guest" in msg.stats.resource_usage_by_pid or time.monotonic() > deadline:
            sample = msg.stats
            break
    stats.cancel()
    assert sample is not None and "guest" in sample.resource_usage_by_pid, sample
    guest = sample.resource_usage_by_pid["guest"].memory
    meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in
               booted.exec("cat", "/proc/meminfo").stdout.decode().splitlines()}
    used = meminfo["MemTotal"] - meminfo["MemFree"]
    # The balloon reports every 2 s: allow for what changed meanwhile (bytes, not KiB or pages).
    assert guest.usage == pytest.approx(used, rel=0.15, abs=8 << 20)
    caches = meminfo["Cached"] + meminfo["Buffers"] + meminfo.get("SwapCached", 0)
    assert guest.cache == pytest.approx(caches, rel=0.15, abs=8 << 20)
    assert guest.rss == pytest.approx(used - caches, rel=0.2, abs=8 << 20)
    # QEMU as the host sees it: its RSS in bytes, against /proc/PID/status.
    pid = next(k for k in sample.resource_usage_by_pid if k.isdigit())
    vmrss = next(int(line.split()[1]) * 1024 for line in
                 Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:"))
    assert sample.agg_resource_usage.memory.rss == pytest.approx(vmrss, rel=0.1)


def _scrape(addr: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_endpoint(booted: Booted) -> None:
    def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return name, tuple(sorted({"task": "vm", "vm": booted.task.id, **labels}.items()))

    wanted = [key("vmdriver_guest_network_bytes_total", direction="receive"),
              key("vmdriver_guest_memory_bytes", kind="total"), key("vmdriver_vm_boot_seconds")]
    deadline = time.monotonic() + 30
    while True:
        m = _scrape(booted.metrics)
        if all(k in m for k in wanted) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert m[key("vmdriver_vm_state")] == 2  # running
    assert m[key("vmdriver_vm_rss_bytes")] > 20 << 20
    assert m[key("vmdriver_vm_cpu_seconds_total", mode="user")] > 1
    assert 0 < m[key("vmdriver_vm_start_seconds")] < 60
    assert 0 < m[key("vmdriver_vm_boot_seconds")] < BOOT_TIMEOUT
    total = m[key("vmdriver_guest_memory_bytes", kind="total")]
    assert 150 << 20 < total <= 256 << 20  # the guest's MemTotal of its 256 MiB, in bytes
    assert m[key("vmdriver_guest_block_bytes_total", direction="read")] > 1 << 20
    assert m[key("vmdriver_guest_network_bytes_total", direction="receive")] > 0
    assert ("vmdriver_vm_stops_total", (("outcome", "killed"),)) in m
    labels = {k for name_labels in m for k, _ in name_labels[1]}
    assert labels <= {"vm", "task", "mode", "kind", "direction", "outcome"}


def test_guest_events(booted: Booted) -> None:
    ev = booted.events
    started = ev.wait_for("VM started", 5)
    assert started.task_name == "vm" and started.alloc_id == booted.alloc.id
    ready = ev.wait_for("guest ready", 5)
    agent = ev.wait_for("guest agent connected", 5)
    assert float(agent.annotations["seconds"]) > 1
    ip = ev.wait_for("IP known: ", 30)
    assert "10.0.2.15" in ip.annotations["addresses"].split(",")  # the guest's user-mode address
    assert ready.timestamp.ToNanoseconds() <= ip.timestamp.ToNanoseconds()


def test_signal_reaches_guest_processes_but_not_the_agent(booted: Booted) -> None:
    booted.exec("/bin/sh", "-c", "sleep 1001 >/dev/null 2>&1 &")
    assert "sleep 1001" in booted.exec("/bin/ps").stdout.decode()
    booted.plugin.driver.SignalTask(pb.SignalTaskRequest(task_id=booted.task.id,
                                                         signal="SIGUSR1"), timeout=30)
    ps = booted.exec("/bin/ps").stdout.decode()  # the agent still answers
    assert "sleep 1001" not in ps and "qemu-ga" in ps, ps
    booted.events.wait_for("SIGUSR1 sent to ", 5)
    with pytest.raises(grpc.RpcError) as err:
        booted.plugin.driver.SignalTask(pb.SignalTaskRequest(task_id=booted.task.id,
                                                             signal="SIGNOPE"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_sigterm_shuts_the_guest_down(booted: Booted) -> None:
    """Last: the guest powers off."""
    booted.plugin.driver.SignalTask(pb.SignalTaskRequest(task_id=booted.task.id,
                                                         signal="SIGTERM"), timeout=30)
    result = booted.plugin.driver.WaitTask(pb.WaitTaskRequest(task_id=booted.task.id), timeout=60)
    assert result.result.exit_code == 0 and not result.err, result
    booted.events.wait_for("SIGTERM: asked the guest to shut down", 5)
    booted.events.wait_for("VM exited: guest powered off", 5)


def test_tasks_without_a_working_agent_get_clear_errors(booted: Booted, guest_dir: Path) -> None:
    """No agent configured, and an agent that does not answer (yet): one clear line each."""
    plugin = booted.plugin
    cases = {"noagent": ({}, "without a guest agent"),
             "mute": ({"guest_agent": True}, "guest agent does not answer")}
    for name, (extra, words) in cases.items():
        cfg = qemu_config(booted.alloc, guest_dir, name, **extra)
        if name == "mute":
            # A disk nothing boots from: the agent's port exists and nobody ever answers
            # (a booting guest would start answering during the test).
            blank = booted.alloc.root / name / "local" / "disk.qcow2"
            blank.unlink()
            subprocess.run(("qemu-img", "create", "-q", "-f", "qcow2", str(blank), "16M"),
                           check=True)
        task, _ = booted.alloc.task(name, cfg)
        plugin.driver.StartTask(pb.StartTaskRequest(task=task), timeout=60)
        try:
            with pytest.raises(grpc.RpcError) as err:
                plugin.driver.ExecTask(pb.ExecTaskRequest(task_id=task.id, command=["true"]),
                                       timeout=30)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert words in str(err.value.details()), err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                plugin.driver.SignalTask(pb.SignalTaskRequest(task_id=task.id, signal="SIGHUP"),
                                         timeout=30)
            assert words in str(err.value.details()), err.value.details()
        finally:
            plugin.driver.DestroyTask(pb.DestroyTaskRequest(task_id=task.id, force=True),
                                      timeout=30)
