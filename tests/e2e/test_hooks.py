"""The supervisor's hooks for faces, against a real (jailed) QEMU without a guest:
configure-while-paused, fds handed to QEMU over QMP, signals that reach a jailed QEMU."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.guest import request
from vmdriver.errors import MonitorError
from vmdriver.host.config import HostConfig
from vmdriver.jail.plan import catches
from vmdriver.runtime.request import LaunchRequest, QmpCall
from vmdriver.runtime.supervisor import Supervisor
from vmdriver.spec import ShutdownPolicy, VMSpec

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]


def bare(host: HostConfig, vm_id: str) -> LaunchRequest:
    """A VM with no disk and no guest: QEMU runs, nothing boots."""
    spec = VMSpec(name=vm_id.rsplit("/", 1)[-1], args=("-nodefaults",),
                  shutdown=ShutdownPolicy(timeout_s=2))
    return request(host, vm_id, spec, None)


def jailed(pid: int | None) -> bool:
    return pid is not None and psutil.Process(pid).uids().real >= 200000


def test_configure_runs_while_paused_and_its_error_aborts_the_launch(host: HostConfig) -> None:
    seen: list[str] = []

    async def configure(qmp: QmpCall) -> None:
        seen.append((await qmp("query-status", None))["status"])

    async def failing(qmp: QmpCall) -> None:
        await qmp("no-such-command", None)

    async def main() -> None:
        sup = Supervisor(host)
        await sup.start(dataclasses.replace(bare(host, "a/conf"), configure=configure))
        assert seen == ["prelaunch"]  # QEMU had not run the guest yet
        assert (await sup.qmp("a/conf", "query-status"))["status"] == "running"
        await sup.stop("a/conf")
        req = dataclasses.replace(bare(host, "a/fail"), configure=failing)
        with pytest.raises(MonitorError, match="no-such-command"):
            await sup.start(req)
        assert "a/fail" not in sup and not req.dirs.runtime.exists()

    asyncio.run(main())


def test_add_fd_gives_a_jailed_qemu_a_file_it_cannot_open_by_name(
        host: HostConfig, tmp_path: Path) -> None:
    image = tmp_path / "cd.img"
    image.write_bytes(b"\0" * 65536)

    async def node(sup: Supervisor, name: str, filename: str) -> Any:
        return await sup.qmp("a/fd", "blockdev-add", {
            "driver": "raw", "node-name": name, "read-only": True,
            "file": {"driver": "file", "filename": filename}})

    async def main() -> None:
        sup = Supervisor(host)
        info = await sup.start(bare(host, "a/fd"))
        assert jailed(info.pid), "this host builds jails; the test needs one"
        with pytest.raises(MonitorError):
            await node(sup, "by-name", str(image))  # outside the jail: QEMU cannot see it
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            path = await sup.add_fd("a/fd", fd)
        finally:
            os.close(fd)
        assert path.startswith("/dev/fdset/")
        await node(sup, "by-fd", path)
        nodes = await sup.qmp("a/fd", "query-named-block-nodes")
        assert {n["node-name"] for n in nodes} >= {"by-fd"}
        assert next(n for n in nodes if n["node-name"] == "by-fd")["image"]["virtual-size"] == 65536
        await sup.stop("a/fd")

    asyncio.run(main())


def test_signal_reaches_a_jailed_qemu(host: HostConfig) -> None:
    async def main() -> None:
        sup = Supervisor(host)
        info = await sup.start(bare(host, "a/sig"))
        assert info.pid is not None and jailed(info.pid)
        sup.signal("a/sig", signal.SIGWINCH)  # ignored by default: QEMU keeps running
        await asyncio.sleep(0.5)
        assert (await sup.qmp("a/sig", "query-status"))["status"] == "running"
        # A signal QEMU has no handler for would be dropped by the kernel for the init of a
        # pid namespace; unjailed it would end QEMU, and so it must here.
        sig = next(s for s in (signal.SIGUSR2, signal.SIGALRM, signal.SIGPWR)
                   if not catches(info.pid, s))
        os.kill(info.pid, sig)
        await asyncio.sleep(0.5)
        assert (await sup.qmp("a/sig", "query-status"))["status"] == "running"  # dropped
        sup.signal("a/sig", sig)
        result = await asyncio.wait_for(sup.wait("a/sig"), 20)
        assert result.signal == signal.SIGKILL, result
        sup.signal("a/sig", signal.SIGTERM)  # exited: a no-op

    asyncio.run(main())


def test_signal_term_ends_a_jailed_qemu_cleanly(host: HostConfig) -> None:
    async def main() -> None:
        sup = Supervisor(host)
        info = await sup.start(bare(host, "a/term"))
        assert jailed(info.pid)
        sup.signal("a/term", signal.SIGTERM)
        result = await asyncio.wait_for(sup.wait("a/term"), 20)
        assert (result.exit_code, result.signal) == (0, 0), result  # QEMU's own exit on SIGTERM

    asyncio.run(main())


def test_event_listeners_get_qmp_events_until_unsubscribed_or_the_vm_ends(
        host: HostConfig, caplog: pytest.LogCaptureFixture) -> None:
    async def pause_and_resume(sup: Supervisor) -> None:
        """STOP and RESUME, returning once a stream subscribed meanwhile had the RESUME
        (every listener gets an event in one go, so all of them had it by then)."""
        async with sup.events("a/ev", "RESUME") as resumes:
            await sup.qmp("a/ev", "stop")
            await sup.qmp("a/ev", "cont")
            event = await asyncio.wait_for(anext(resumes), 10)
        assert event["event"] == "RESUME" and "timestamp" in event

    def failing(event: dict[str, Any]) -> None:
        raise RuntimeError("a face's bug")

    async def main() -> None:
        sup = Supervisor(host)
        await sup.start(bare(host, "a/ev"))
        seen: list[str] = []
        sup.on_event("a/ev", failing)
        unsubscribe = sup.on_event("a/ev", lambda event: seen.append(event["event"]))
        await pause_and_resume(sup)
        assert seen == ["STOP", "RESUME"]  # the failing listener was dropped, not the others
        assert "dropping an event listener that failed" in caplog.text
        unsubscribe()
        await pause_and_resume(sup)
        assert seen == ["STOP", "RESUME"]
        async with sup.events("a/ev") as everything:
            await sup.stop("a/ev")
            names = [event["event"] async for event in everything]  # ends with the VM
        assert "SHUTDOWN" in names, names
        async with sup.events("a/ev") as after:
            assert [event async for event in after] == []  # ended already

    asyncio.run(main())
