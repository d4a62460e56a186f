"""Suspend on stop, resume on the next start: guest memory and disk writes survive; a failed
save falls back to a graceful power-off with the disk kept."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from tests.e2e.guest import READY, free_port, request
from tests.snapshots.guestops import MARK_OFFSET, counter, read_mark, sh, spec, start_counter, write_mark
from vmdriver.host.config import HostConfig
from vmdriver.runtime.console import wait_for_line
from vmdriver.runtime.request import LaunchRequest
from vmdriver.runtime.snapshots import suspend_dir
from vmdriver.runtime.state import ExitKind
from vmdriver.runtime.supervisor import Supervisor

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]
BOOT_TIMEOUT = 120.0
ENV = {"NOMAD_JOB_NAME": "job", "NOMAD_GROUP_NAME": "grp"}


async def _guest_mark(sup: Supervisor, vm_id: str, length: int) -> bytes:
    # O_DIRECT-free read of the raw disk: dd through the guest's block layer after a drop.
    return await sh(sup.agent(vm_id), f"sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda "
                                      f"bs=4096 skip={MARK_OFFSET // 4096} count=1 2>/dev/null "
                                      f"| head -c {length}")


async def _new_line(log: Path, seen: int, text: str) -> None:
    for _ in range(int(BOOT_TIMEOUT * 5)):
        if text in (await asyncio.to_thread(log.read_text))[seen:]:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{text} did not appear in {log}")


def test_suspend_then_resume_keeps_memory_and_disk(host: HostConfig, guest_dir: Path) -> None:
    host = host.model_copy(update={"image_paths": (str(guest_dir),)})
    port = free_port()
    task = spec("susp", port, suspend=True)

    def req(vm_id: str, first: bool) -> LaunchRequest:
        return dataclasses.replace(request(host, vm_id, task, guest_dir if first else None),
                                   env=ENV)

    async def main() -> None:
        sup = Supervisor(host)
        first = req("a1/susp", True)
        vm = await sup.start(first)
        await wait_for_line(vm.stdout, READY, BOOT_TIMEOUT)
        await start_counter(sup.agent("a1/susp"))
        await write_mark(sup.agent("a1/susp"), "suspended-mark")
        await asyncio.sleep(1.5)
        before = await counter(sup.agent("a1/susp"))
        generation = (await sup.qmp("a1/susp", "query-vm-generation-id"))["guid"]
        result = await sup.stop("a1/susp")
        assert result.kind is not ExitKind.KILLED, result
        assert "powering off" not in vm.stdout.read_text()  # saved, not shut down
        saved = suspend_dir(first, host)
        assert saved.state_file.exists() and saved.load().has_state
        disk = saved.disks_dir / "disk0.qcow2"
        assert read_mark(disk, 14) == b"suspended-mark"

        # Another alloc of the same job/group/task resumes it.
        seen = len(vm.stdout.read_text())  # the allocs share one log file here
        vm2 = await sup.start(req("a2/susp", False))
        agent = sup.agent("a2/susp")
        resumed = await counter(agent)
        assert resumed >= before  # the in-memory counter went on from its value ...
        await asyncio.sleep(0.8)
        assert await counter(agent) > resumed  # ... and runs
        assert await _guest_mark(sup, "a2/susp", 14) == b"suspended-mark"
        assert READY not in vm2.stdout.read_text()[seen:]  # no boot: resumed
        assert not saved.state_file.exists()  # a state is loaded once
        # The same VM again: its generation id stays (only clones get new ones).
        assert (await sup.qmp("a2/susp", "query-vm-generation-id"))["guid"] == generation

        # A save that fails (its temp file cannot be created) falls back to a graceful
        # stop; the disk with its writes stays for the next start.
        await write_mark(agent, "after-resume-mk")
        (saved.path / ".state.tmp").mkdir()
        result = await sup.stop("a2/susp")
        assert "powering off" in vm2.stdout.read_text()[seen:], result
        assert not saved.load().has_state
        assert read_mark(disk, 15) == b"after-resume-mk"
        (saved.path / ".state.tmp").rmdir()
        seen = len(vm.stdout.read_text())
        vm3 = await sup.start(req("a3/susp", False))
        await _new_line(vm3.stdout, seen, READY)  # a cold boot ...
        assert await _guest_mark(sup, "a3/susp", 15) == b"after-resume-mk"  # ... on the kept disk
        await sup.stop_all(timeout=20)

    asyncio.run(main())
