"""The supervisor against real QEMU and the test guest: boot, serve, stop, fail."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.e2e.guest import READY, free_port, guest_spec, request
from vmdriver.errors import LaunchError
from vmdriver.host.config import HostConfig
from vmdriver.qemu.devices import QGA_DEVICE
from vmdriver.runtime.console import wait_for_line
from vmdriver.runtime.state import ExitKind, VMState
from vmdriver.runtime.supervisor import Supervisor
from vmdriver.spec import ShutdownPolicy, VMSpec

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]
BOOT_TIMEOUT = 90.0


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
        req = request(host, "a/web", guest_spec("web", host_port=port, guest_agent=True), guest_dir)
        vm = await sup.start(req)
        assert vm.state is VMState.RUNNING
        agent_port_opened = asyncio.Event()

        def on_event(event: dict[str, Any]) -> None:
            if event["event"] == "VSERPORT_CHANGE" and event["data"] == {"id": QGA_DEVICE,
                                                                          "open": True}:
                agent_port_opened.set()

        sup.on_event("a/web", on_event)
        # Jailed (this host can build jails): QEMU runs as a uid of its own, no root.
        assert vm.pid is not None and psutil.Process(vm.pid).uids().real >= 200000
        # The control plane lives in the runtime dir, outside the task dir.
        assert req.dirs.record.exists() and req.dirs.qmp_socket.exists()
        assert not list(req.dirs.task.path.rglob("*.sock"))
        line = await wait_for_line(vm.stdout, READY, BOOT_TIMEOUT)
        assert "http=8080" in line
        async with httpx.AsyncClient() as client:
            resp = await client.get(f"http://127.0.0.1:{port}/", timeout=20)
        assert resp.status_code == 200 and "vmdriver-test-guest" in resp.text
        info = await asyncio.to_thread(guest_agent_ping, req.dirs.qga_socket)
        assert "version" in info["return"]  # type: ignore[operator]
        # What the runner waits for before it pings the agent (QEMU reports ports with an id).
        await asyncio.wait_for(agent_port_opened.wait(), 10)
        t0 = time.monotonic()
        result = await sup.stop("a/web")
        assert result.kind is ExitKind.STOPPED and result.clean, result
        assert time.monotonic() - t0 < 25
        assert "powering off" in vm.stdout.read_text()
        assert sup.info("a/web").state is VMState.EXITED
        assert not req.dirs.runtime.exists()

    asyncio.run(main())


def test_guest_ignoring_acpi_is_killed_after_kill_timeout(host: HostConfig, guest_dir: Path) -> None:
    async def main() -> None:
        sup = Supervisor(host.model_copy(update={"image_paths": (str(guest_dir),)}))
        spec = guest_spec("deaf", mode="ignore-acpi", timeout=2.0)
        vm = await sup.start(request(host, "a/deaf", spec, guest_dir))
        await wait_for_line(vm.stdout, READY, BOOT_TIMEOUT)
        t0 = time.monotonic()
        result = await sup.stop("a/deaf")
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
        await sup.start(request(host, f"a/{mode}", guest_spec(mode, mode=mode), guest_dir))
        result = await asyncio.wait_for(sup.wait(f"a/{mode}"), BOOT_TIMEOUT)
        assert result.kind is kind, result
        assert result.successful is (kind is ExitKind.GUEST_POWEROFF)

    asyncio.run(main())


def bare_spec(name: str) -> VMSpec:
    """A VM with no disk: enough to exercise the supervisor without booting."""
    return VMSpec(name=name, args=("-nodefaults",), shutdown=ShutdownPolicy(timeout_s=2))


def test_qemu_crash_is_reported_with_exit_code(host: HostConfig) -> None:
    async def main() -> None:
        sup = Supervisor(host)
        vm = await sup.start(request(host, "a/crash", bare_spec("crash"), None))
        assert vm.pid is not None
        # SIGKILL: a jailed QEMU is its pid namespace's init, which the kernel shields
        # from every other signal it has no handler for.
        os.kill(vm.pid, signal.SIGKILL)
        result = await asyncio.wait_for(sup.wait("a/crash"), 30)
        assert result.kind is ExitKind.CRASHED
        assert (result.exit_code, result.signal) == (128 + signal.SIGKILL, signal.SIGKILL)
        assert not result.successful

    asyncio.run(main())


def test_qemu_failing_at_start_reports_exit_code_and_stderr(host: HostConfig) -> None:
    async def main() -> None:
        # The operator allows -device: the bad driver gets to QEMU, which refuses it.
        sup = Supervisor(host.model_copy(update={"args_allowlist": ("-device",)}))
        spec = VMSpec(name="bad", args=("-device", "no-such-device"))
        req = request(host, "a/bad", spec, None)
        with pytest.raises(LaunchError) as exc:
            await sup.start(req)
        assert exc.value.exit_code == 1
        assert "no-such-device" in exc.value.stderr_tail
        assert "a/bad" not in sup
        assert not req.dirs.runtime.exists()

    asyncio.run(main())


def test_reattach_after_supervisor_loss(host: HostConfig) -> None:
    async def main() -> None:
        first = Supervisor(host)
        vm = await first.start(request(host, "a/keep", bare_spec("keep"), None))
        # record.pid is the process this supervisor spawned (a jail's monitor, if jailed).
        record, pid = first.record("a/keep"), first.record("a/keep").pid
        await first.detach_all()  # the supervisor goes away; QEMU must not
        assert pid is not None
        os.kill(pid, 0)
        second = Supervisor(host)
        again = await second.recover(record)
        assert again.pid == vm.pid
        assert (await second.qmp("a/keep", "query-status"))["status"] == "running"
        result = await second.stop("a/keep")
        assert result.kind is ExitKind.STOPPED
        # QEMU is still this test process's child (a real plugin restart would have
        # handed it to init): it must be dead, and reaping it here shows that.
        assert (await asyncio.to_thread(os.waitpid, pid, 0))[0] == pid

    asyncio.run(main())
