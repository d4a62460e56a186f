"""Live migration between supervisors on this host: over a unix socket, then over TCP on
loopback; the guest's counter and disk come along; a refusing destination leaves the
source running."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.guest import READY, free_port, request
from tests.snapshots.guestops import MARK_OFFSET, counter, http_ok, sh, spec, start_counter, write_mark
from vmdriver.errors import MonitorError
from vmdriver.host.config import HostConfig
from vmdriver.qemu.agent import GuestAgent
from vmdriver.qemu.monitor import Monitor
from vmdriver.runtime.console import wait_for_line
from vmdriver.runtime.livemigrate import migrate_recorded
from vmdriver.runtime.record import VMRecord
from vmdriver.runtime.supervisor import Supervisor

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]
BOOT_TIMEOUT = 120.0
MARK = "migrated-mark"


def _receiver(state_dir: Path, listen: str, image_paths: list[str]) -> subprocess.Popen[str]:
    """A second supervisor: `vmdriver receive` in its own process."""
    cfg = state_dir / f"host-{abs(hash(listen))}.hcl"
    paths = ", ".join(f'"{p}"' for p in image_paths)
    cfg.write_text(f'image_paths = [{paths}]\nstate_dir = "{state_dir}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "vmdriver.cli.main", "receive", "--listen",
                             listen, "--host-config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert "listening" in proc.stdout.readline()
    return proc


def _other_vm(state_dir: Path, not_id: str) -> VMRecord:
    recs = [r for r, running in Supervisor.known(state_dir) if running and r.id != not_id]
    assert len(recs) == 1, recs
    return recs[0]


async def _guest_state(agent: GuestAgent, before: int) -> None:
    """The counter went on from ``before`` and runs; the disk holds the marker."""
    now = await counter(agent)
    assert now >= before
    await asyncio.sleep(0.6)
    assert await counter(agent) > now
    got = await sh(agent, f"sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=4096 "
                          f"skip={MARK_OFFSET // 4096} count=1 2>/dev/null | head -c {len(MARK)}")
    assert got == MARK.encode()


async def _generation(rec: VMRecord) -> str:
    monitor = Monitor("test")
    await monitor.connect(Path(rec.qmp_socket))
    try:
        return str((await monitor.execute("query-vm-generation-id"))["guid"])
    finally:
        await monitor.disconnect()


def _port(report_forwards: list[str]) -> int:
    match = re.search(r"host:(\d+)", report_forwards[0])
    assert match, report_forwards
    return int(match.group(1))


async def _refused(sup: Supervisor, host: HostConfig, refusing: subprocess.Popen[str],
                   disk: Path) -> None:
    """A destination whose policy refuses the disk: the source runs on, its disk in place."""
    with pytest.raises(MonitorError, match="refused"):
        await migrate_recorded(sup.record("m/mig"), host, f"unix:{host.state_dir}/no.sock")
    assert refusing.wait(30) != 0
    assert (await sup.qmp("m/mig", "query-status"))["status"] == "running"
    assert await asyncio.to_thread(disk.exists)


def test_live_migration_keeps_counter_and_disk(host: HostConfig, guest_dir: Path) -> None:
    host = host.model_copy(update={"image_paths": (str(guest_dir),)})
    state = host.state_dir

    sup = Supervisor(host)
    procs: list[subprocess.Popen[str]] = []

    def receiver(listen: str, image_paths: list[str]) -> subprocess.Popen[str]:
        procs.append(_receiver(state, listen, image_paths))
        return procs[-1]

    async def main() -> None:
        req = request(host, "m/mig", spec("mig", free_port()), guest_dir)
        vm = await sup.start(req)
        await wait_for_line(vm.stdout, READY, BOOT_TIMEOUT)
        await start_counter(sup.agent("m/mig"))
        await write_mark(sup.agent("m/mig"), MARK)
        disk = req.dirs.task.local / "disk.qcow2"

        await _refused(sup, host, receiver(f"unix:{state}/no.sock", []), disk)
        before = await counter(sup.agent("m/mig"))
        generation = (await sup.qmp("m/mig", "query-vm-generation-id"))["guid"]

        # Over a unix socket to a second supervisor.
        first = receiver(f"unix:{state}/in.sock", [str(guest_dir)])
        report = await migrate_recorded(sup.record("m/mig"), host, f"unix:{state}/in.sock")
        assert report.destination["status"] == "running" and report.downtime_ms < 10_000
        assert report.total_s > 0 and report.ram_mib > 0
        await asyncio.wait_for(sup.wait("m/mig"), 30)  # the source ended after
        moved = _other_vm(state, "m/mig")
        await _guest_state(GuestAgent(Path(moved.qga_socket)), before)
        assert await http_ok(_port(report.destination["forwards"]))
        assert await _generation(moved) == generation  # the same VM, moved

        # From there over TCP on loopback to a third.
        tcp = free_port()
        second = receiver(f"127.0.0.1:{tcp}", [str(guest_dir)])
        before = await counter(GuestAgent(Path(moved.qga_socket)))
        report = await migrate_recorded(moved, host, f"127.0.0.1:{tcp}")
        assert first.wait(60) == 0  # its VM left: the first receiver is done
        again = _other_vm(state, moved.id)
        await _guest_state(GuestAgent(Path(again.qga_socket)), before)
        second.send_signal(signal.SIGINT)  # a graceful stop of the last one
        assert second.wait(60) == 0, second.stderr.read() if second.stderr else ""

    async def guarded() -> None:
        try:
            await main()
        finally:
            await sup.kill_all()
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(30)
                for pipe in (proc.stdout, proc.stderr):
                    if pipe is not None:
                        pipe.close()

    asyncio.run(guarded())
