"""The reshaped core against real QEMU: many drives, an empty tray, UEFI, a TPM helper.

What the guest sees is read from inside it through the guest agent
(``guest-exec``), what QEMU holds through QMP, and what the host keeps from the
file system: not from vmdriver's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.guest import READY, task_dirs
from vmdriver.host.config import HostConfig
from vmdriver.qemu.agent import GuestAgent
from vmdriver.runtime.console import wait_for_line
from vmdriver.runtime.record import VMRecord
from vmdriver.runtime.state import ExitKind
from vmdriver.runtime.supervisor import Supervisor
from vmdriver.spec import Bus, Drive, FileMedium, Firmware, ShutdownPolicy, Tpm, VMSpec

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]
BOOT_TIMEOUT = 120.0
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


async def guest_read(sock: Path, path: str) -> str:
    """A file as the guest sees it, read through qemu-ga's file calls."""
    return (await GuestAgent(sock).read_file(path)).decode()


def data_image(path: Path, size: str) -> None:
    subprocess.run(("qemu-img", "create", "-q", "-f", "raw", str(path), size), check=True)


def test_many_drives_empty_tray_and_medium_change(host: HostConfig, guest_dir: Path) -> None:
    async def main() -> None:
        sup = Supervisor(host.model_copy(update={"image_paths": (str(guest_dir),)}))
        dirs = task_dirs(host, "a/disks", guest_dir)
        data_image(dirs.task.local / "data.raw", "64M")
        data_image(dirs.task.local / "logs.raw", "32M")
        spec = VMSpec(
            name="disks", machine_type="q35", guest_agent=True,
            drives=(
                Drive(id="root", medium=FileMedium(path="local/disk.qcow2", format="qcow2"),
                      boot_index=0, serial="vmd-root"),
                Drive(id="data", medium=FileMedium(path="local/data.raw"), bus=Bus.SCSI,
                      serial="vmd-data"),
                Drive(id="logs", medium=FileMedium(path="local/logs.raw"), bus=Bus.SCSI,
                      read_only=True),
                Drive(id="cd0", kind="cdrom", bus=Bus.SATA),
            ),
            shutdown=ShutdownPolicy(graceful=True, via_agent=True, timeout_s=20),
        )
        from vmdriver.runtime.request import LaunchRequest

        vm = await sup.start(LaunchRequest(vm_id="a/disks", spec=spec, dirs=dirs))
        await wait_for_line(vm.stdout, READY, BOOT_TIMEOUT)
        blocks = {b.get("qdev", ""): b for b in await sup.qmp("a/disks", "query-block")}
        assert "inserted" not in blocks["cd0"] and blocks["cd0"]["removable"]
        assert blocks["data"]["inserted"]["node-name"] == "data"  # addressable by QMP
        assert blocks["logs"]["inserted"]["ro"] and not blocks["data"]["inserted"]["ro"]
        # The guest sees each disk, its size, and the stable serial.
        parts = await guest_read(dirs.qga_socket, "/proc/partitions")
        rows = [f for f in map(str.split, parts.splitlines()) if len(f) == 4 and f[2].isdigit()]
        sizes = {f[3]: int(f[2]) for f in rows}
        assert sizes.get("vda", 0) > 0 and sorted(v for k, v in sizes.items() if k.startswith("sd")) \
            == [32 * 1024, 64 * 1024], sizes
        serial = await guest_read(dirs.qga_socket, "/sys/block/vda/serial")
        assert serial.strip() == "vmd-root"
        # The 32 MiB disk (65536 sectors) is the read-only one, as the guest's kernel sees it.
        flags = {}
        for name in (k for k in sizes if k.startswith("sd") and k[-1].isalpha()):
            size = (await guest_read(dirs.qga_socket, f"/sys/block/{name}/size")).strip()
            flags[size] = (await guest_read(dirs.qga_socket, f"/sys/block/{name}/ro")).strip()
        assert flags == {"65536": "1", "131072": "0"}, flags
        # Load the empty tray by its device id, as the runner's CD change will.
        await sup.qmp("a/disks", "blockdev-change-medium", {
            "id": "cd0", "filename": str(guest_dir / "guest.iso"), "format": "raw",
            "read-only-mode": "read-only"})
        blocks = {b.get("qdev", ""): b for b in await sup.qmp("a/disks", "query-block")}
        assert blocks["cd0"]["inserted"]["file"].endswith("guest.iso")
        result = await sup.stop("a/disks")
        assert result.kind is ExitKind.STOPPED, result
        # The stop went through the agent's guest-shutdown, not the ACPI button.
        console = vm.stdout.read_text()
        assert "shutdown requested (poweroff)" in console and "power button" not in console

    asyncio.run(main())


# A supervisor in another process: started, then killed with SIGKILL by the test.
_SUPERVISOR = """
import asyncio, json, sys
from pathlib import Path
from vmdriver.host.config import HostConfig
from vmdriver.qemu.agent import GuestAgent
from vmdriver.runtime.request import LaunchRequest
from vmdriver.runtime.supervisor import Supervisor
from vmdriver.runtime.taskdir import TaskDir, VMDirs
from vmdriver.spec import VMSpec

async def main() -> None:
    host = HostConfig(**json.loads(sys.argv[1]))
    spec = VMSpec.model_validate_json(sys.argv[2])
    dirs = VMDirs.under(host.state_dir, "a/tpm", TaskDir(host.state_dir / "allocs" / "a", "tpm"))
    info = await Supervisor(host).start(LaunchRequest(vm_id="a/tpm", spec=spec, dirs=dirs))
    print(dirs.record, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def uefi_tpm_spec(data_dir: Path, guest_dir: Path) -> VMSpec:
    cmdline = (guest_dir / "cmdline").read_text().strip()
    return VMSpec(
        name="tpm", machine_type="q35", tpm=Tpm(model="tpm-crb"),
        firmware=Firmware(kind="uefi", code=str(OVMF_CODE), vars_template=str(OVMF_VARS),
                          vars=str(data_dir / "OVMF_VARS.fd")),
        args=("-kernel", str(guest_dir / "vmlinuz"), "-initrd", str(guest_dir / "initrd.img"),
              "-append", cmdline),
        shutdown=ShutdownPolicy(graceful=True, timeout_s=20),
    )


@pytest.mark.skipif(not OVMF_CODE.exists(), reason="Debian's ovmf is not installed")
def test_uefi_and_tpm_helper_outlive_a_killed_supervisor(host: HostConfig, guest_dir: Path) -> None:
    host = host.model_copy(update={"image_paths": (str(guest_dir),)})
    dirs = task_dirs(host, "a/tpm", None)
    spec = uefi_tpm_spec(dirs.data, guest_dir)
    settings = json.dumps({"state_dir": str(host.state_dir), "image_paths": [str(guest_dir)]})
    proc = subprocess.Popen((sys.executable, "-c", _SUPERVISOR, settings, spec.model_dump_json()),
                            stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout is not None
        record_path = Path(proc.stdout.readline().strip())
        record = VMRecord.load(record_path)
        # swtpm, and the writer of the console logs (runtime.logs).
        assert record is not None and [h.name for h in record.helpers] == ["swtpm", "logwriter"]
        swtpm, writer = (psutil.Process(h.pid) for h in record.helpers)
        assert swtpm.name() == "swtpm" and swtpm.create_time() < record.started_at + 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    # The VM and its helper outlive the supervisor; a new one re-attaches and stops both.
    assert psutil.pid_exists(record.pid) and swtpm.is_running() and writer.is_running()
    # OVMF's vars were copied into the data dir once, before QEMU started.
    assert (dirs.data / "OVMF_VARS.fd").stat().st_size == OVMF_VARS.stat().st_size
    assert (dirs.data / "tpm").is_dir()

    async def recover_and_stop() -> None:
        sup = Supervisor(host)
        await sup.recover(record)
        await wait_for_line(Path(record.stdout), READY, BOOT_TIMEOUT)
        tpm = await sup.qmp("a/tpm", "query-tpm")
        assert tpm[0]["model"] == "tpm-crb" and tpm[0]["options"]["type"] == "emulator"
        await sup.stop("a/tpm")

    asyncio.run(recover_and_stop())
    # Both were orphaned to init when the supervisor died, so they may linger as zombies.
    assert gone(swtpm) and gone(writer) and gone(psutil.Process(record.pid))
    assert not record_path.parent.exists(), "runtime dir left behind"
    # The TPM state stays in the data dir for the next start.
    assert any((dirs.data / "tpm").iterdir())


def gone(proc: psutil.Process, timeout: float = 10) -> bool:
    """True once ``proc`` has exited (a zombie has)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False
