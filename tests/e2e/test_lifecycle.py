"""The supervisor against real QEMU and the test guest: boot, serve, stop, fail."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.guest import READY, free_port, guest_spec, overlay
from vmdriver.errors import LaunchError
from vmdriver.host.config import HostConfig
from vmdriver.runtime.console import wait_for_line
from vmdriver.runtime.state import ExitKind, VMState
from vmdriver.runtime.supervisor import Supervisor
from vmdriver.runtime.taskdir import TaskDir
from vmdriver.spec import ShutdownPolicy, VMSpec

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]
BOOT_TIMEOUT = 90.0


def task_dir(host: HostConfig, name: str, guest_dir: Path | None) -> TaskDir:
    td = TaskDir(host.state_dir / "allocs" / name, name)
    td.create()
    if guest_dir is not None:
        overlay(guest_dir, td.local / "disk.qcow2")
    return td


def guest_agent_ping(sock_path: Path) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(str(sock_path))
        s.sendall(b'{"execute":"guest-info"}\n')
        data = b""
        while not data.endswith(b"\n"):
            data += s.recv(65536)
    return dict(json.loads(data))


def test_boot_serve_agent_and_graceful_stop(host: HostConfig, guest_dir: Path) -> None:
    async def main() -> None:
        sup = Supervisor(host.model_copy(update={"image_paths": (str(guest_dir),)}))
        port = free_port()
        td = task_dir(host, "web", guest_dir)
        vm = await sup.start("a/web", guest_spec("web", host_port=port, guest_agent=True), td)
        assert vm.state is VMState.RUNNING
        assert td.state_file.exists() and td.qmp_socket.exists()
        line = await wait_for_line(vm.stdout, READY, BOOT_TIMEOUT)
        assert "http=8080" in line
        async with httpx.AsyncClient() as client:
            resp = await client.get(f"http://127.0.0.1:{port}/", timeout=20)
        assert resp.status_code == 200 and "vmdriver-test-guest" in resp.text
        info = await asyncio.to_thread(guest_agent_ping, td.qga_socket)
        assert "version" in info["return"]  # type: ignore[operator]
        t0 = time.monotonic()
        result = await vm.stop()
        assert result.kind is ExitKind.STOPPED and result.clean, result
        assert time.monotonic() - t0 < 25
        assert "powering off" in vm.stdout.read_text()
        assert vm.state is VMState.EXITED
        assert not td.state_file.exists() and not td.qmp_socket.exists()

    asyncio.run(main())


def test_guest_ignoring_acpi_is_killed_after_kill_timeout(host: HostConfig, guest_dir: Path) -> None:
    async def main() -> None:
        sup = Supervisor(host.model_copy(update={"image_paths": (str(guest_dir),)}))
        td = task_dir(host, "deaf", guest_dir)
        vm = await sup.start("a/deaf", guest_spec("deaf", mode="ignore-acpi", timeout=2.0), td)
        await wait_for_line(vm.stdout, READY, BOOT_TIMEOUT)
        t0 = time.monotonic()
        result = await vm.stop()
        elapsed = time.monotonic() - t0
        assert result.kind is ExitKind.KILLED and not result.clean
        assert 2.0 <= elapsed < 15, elapsed
        assert "ignoring power button" in vm.stdout.read_text()

    asyncio.run(main())


@pytest.mark.parametrize(("mode", "kind"), [("panic", ExitKind.PANICKED),
                                            ("poweroff", ExitKind.GUEST_POWEROFF)])
def test_guest_initiated_ends(host: HostConfig, guest_dir: Path, mode: str, kind: ExitKind) -> None:
    async def main() -> None:
        sup = Supervisor(host.model_copy(update={"image_paths": (str(guest_dir),)}))
        td = task_dir(host, mode, guest_dir)
        vm = await sup.start(f"a/{mode}", guest_spec(mode, mode=mode), td)
        result = await asyncio.wait_for(vm.wait(), BOOT_TIMEOUT)
        assert result.kind is kind, result
        assert result.successful is (kind is ExitKind.GUEST_POWEROFF)

    asyncio.run(main())


def bare_spec(name: str) -> VMSpec:
    """A VM with no disk: enough to exercise the supervisor without booting."""
    return VMSpec(name=name, args=("-nodefaults",), shutdown=ShutdownPolicy(timeout_s=2))


def test_qemu_crash_is_reported_with_exit_code(host: HostConfig) -> None:
    async def main() -> None:
        sup = Supervisor(host)
        vm = await sup.start("a/crash", bare_spec("crash"), task_dir(host, "crash", None))
        assert vm.pid is not None
        os.kill(vm.pid, signal.SIGSEGV)
        result = await asyncio.wait_for(vm.wait(), 30)
        assert result.kind is ExitKind.CRASHED
        assert (result.exit_code, result.signal) == (128 + signal.SIGSEGV, signal.SIGSEGV)
        assert not result.successful

    asyncio.run(main())


def test_qemu_failing_at_start_reports_exit_code_and_stderr(host: HostConfig) -> None:
    async def main() -> None:
        sup = Supervisor(host)
        spec = VMSpec(name="bad", args=("-device", "no-such-device"))
        with pytest.raises(LaunchError) as exc:
            await sup.start("a/bad", spec, task_dir(host, "bad", None))
        assert exc.value.exit_code == 1
        assert "no-such-device" in exc.value.stderr_tail
        assert "a/bad" not in sup

    asyncio.run(main())


def test_reattach_after_supervisor_loss(host: HostConfig) -> None:
    async def main() -> None:
        first = Supervisor(host)
        td = task_dir(host, "keep", None)
        vm = await first.start("a/keep", bare_spec("keep"), td)
        record, pid = vm.record(), vm.pid
        await first.detach_all()  # the supervisor goes away; QEMU must not
        assert pid is not None
        os.kill(pid, 0)
        second = Supervisor(host)
        again = await second.recover(record)
        assert again.pid == pid
        assert (await again.qmp("query-status"))["status"] == "running"
        result = await again.stop()
        assert result.kind is ExitKind.STOPPED
        # QEMU is still this test process's child (a real plugin restart would have
        # handed it to init): it must be dead, and reaping it here shows that.
        assert (await asyncio.to_thread(os.waitpid, pid, 0))[0] == pid

    asyncio.run(main())
