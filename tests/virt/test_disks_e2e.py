"""A virt job with four disks under `vmdriver run`: what the pool holds, what the guest sees.

One boot of the test guest serves the module: a chained primary on the guest's
disk image (grown to 128 MiB), an empty SCSI data disk, an empty read-only disk
and a CD-ROM of the guest's ISO. The guest is read through its agent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.virt.helpers import (
    Run,
    agent_read,
    agent_sh,
    bases,
    host_file,
    job_file,
    running,
    volumes,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

MIB = 1024 * 1024
DISKS = """
disk {
  primary = true
  chained = true
  size    = "128MiB"
  devname = "vmd-root"
  source {
    image = "GUEST/disk.qcow2"
  }
}
disk {
  size     = "64MiB"
  bus_type = "scsi"
  devname  = "vmd-data"
}
disk {
  size      = "32MiB"
  read_only = true
  devname   = "vmd-ro"
}
disk {
  kind = "cdrom"
  source {
    image = "GUEST/guest.iso"
  }
}
"""


@dataclass
class Booted:
    run: Run
    pool: Path
    before: list[str]
    qga: Path
    boot_s: float


def qemu_img_info(path: Path) -> dict[str, object]:
    out = subprocess.run(("qemu-img", "info", "-U", "--output=json", str(path)),
                         capture_output=True, text=True, check=True, timeout=30)
    return dict(json.loads(out.stdout))


@pytest.fixture(scope="module")
def booted(guest_dir: Path) -> Iterator[Booted]:
    state = Path(tempfile.mkdtemp(prefix="vtd-", dir="/tmp"))
    try:
        pool = state / "pool"
        host = host_file(state, pool, (guest_dir,))
        job = job_file(state, DISKS.replace("GUEST", str(guest_dir)))
        before = volumes(pool)
        with running(job, host, state) as run:
            t0 = time.monotonic()
            run.wait_for("ready", 240)
            boot_s = time.monotonic() - t0
            print(f"\nvirt job with four disks: guest ready {boot_s:.1f}s after `vmdriver run`")
            yield Booted(run, pool, before, run.qga(), boot_s)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def sysfs(booted: Booted, dev: str, name: str) -> str:
    return agent_read(booted.qga, f"/sys/block/{dev}/{name}").decode().strip()


def test_pool_holds_the_tasks_volumes_while_it_runs(booted: Booted, guest_dir: Path) -> None:
    assert booted.before == []
    names = volumes(booted.pool)
    assert [n.split("-", 1)[1] for n in names] == ["vm-0.qcow2", "vm-1.qcow2", "vm-2.qcow2",
                                                   "vm-3.raw"], names
    infos = [qemu_img_info(booted.pool / n) for n in names]
    iso = (guest_dir / "guest.iso").stat().st_size
    assert [i["virtual-size"] for i in infos] == [128 * MIB, 64 * MIB, 32 * MIB, iso]
    # The primary is an overlay on the pool's one base for the image's content.
    (base,) = bases(booted.pool)
    assert Path(str(infos[0]["backing-filename"])).name == base
    assert "backing-filename" not in infos[1]


def test_guest_sees_each_disk_with_size_bus_and_name(booted: Booted, guest_dir: Path) -> None:
    code, out, _ = agent_sh(booted.qga, "for d in /sys/block/*; do echo ${d##*/} "
                                        "$(readlink -f $d/device); done")
    assert code == 0
    paths = dict(line.split(" ", 1) for line in out.splitlines() if line.strip())
    assert {"vda", "vdb", "sda", "sr0"} <= set(paths), paths
    # virtio-blk disks hang off a virtio device; the SCSI disk off a virtio-scsi target;
    # the CD-ROM off the IDE (ata) controller.
    assert "/virtio" in paths["vda"] and "target" not in paths["vda"]
    assert "/virtio" in paths["sda"] and "target" in paths["sda"]
    assert "/ata" in paths["sr0"]
    assert int(sysfs(booted, "vda", "size")) * 512 == 128 * MIB
    assert int(sysfs(booted, "sda", "size")) * 512 == 64 * MIB
    assert int(sysfs(booted, "vdb", "size")) * 512 == 32 * MIB
    assert int(sysfs(booted, "sr0", "size")) * 512 == (guest_dir / "guest.iso").stat().st_size
    # devname is the serial: virtio-blk shows it in sysfs, SCSI in its VPD page 0x80.
    assert sysfs(booted, "vda", "serial") == "vmd-root"
    assert sysfs(booted, "vdb", "serial") == "vmd-ro"
    assert b"vmd-data" in agent_read(booted.qga, "/sys/block/sda/device/vpd_pg80")


def test_cdrom_and_read_only_disk_refuse_writes(booted: Booted) -> None:
    assert sysfs(booted, "vdb", "ro") == "1"
    assert sysfs(booted, "sr0", "ro") == "1"
    assert sysfs(booted, "sda", "ro") == "0"
    write = "dd if=/dev/zero of=/dev/{} bs=512 count=1 conv=fsync"
    for dev in ("vdb", "sr0"):
        code, _, err = agent_sh(booted.qga, write.format(dev))
        assert code != 0, f"{dev} took a write"
        assert err.strip(), dev
    code, _, err = agent_sh(booted.qga, write.format("sda"))
    assert code == 0, err


def test_volumes_and_base_are_gone_when_the_run_ends(booted: Booted) -> None:
    assert booted.run.stop() == 0, "".join(booted.run.stderr)
    assert volumes(booted.pool) == []
    assert bases(booted.pool) == []


def test_keep_volumes_keeps_them(guest_dir: Path) -> None:
    # No boot needed: the run is stopped as soon as QEMU runs.
    state = Path(tempfile.mkdtemp(prefix="vtk-", dir="/tmp"))
    try:
        pool = state / "pool"
        host = host_file(state, pool, (guest_dir,))
        job = job_file(state, 'disk {\n size = "16MiB"\n}')
        job.write_text(job.read_text().replace('kill_timeout = "20s"', 'kill_timeout = "1s"'))
        with running(job, host, state, "--keep-volumes") as run:
            run.wait_for("running", 60)
            assert len(volumes(pool)) == 1
            run.stop()
        (name,) = volumes(pool)
        assert name.endswith("-vm-0.qcow2")
        assert qemu_img_info(pool / name)["virtual-size"] == 16 * MIB
    finally:
        shutil.rmtree(state, ignore_errors=True)

