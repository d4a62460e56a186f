"""The test guest boots from a chained RBD disk; a second RBD disk is written and read back.

Plain ``qemu-system-x86_64`` (TCG) started here with the options the RBD pool
gives (``-blockdev driver=rbd`` + ``-object secret,file=``); the lead will route
this through vmdriver's runtime. The busybox guest cannot write a disk on
command, so the data disk is written by QEMU's block layer (HMP ``qemu-io`` on the
device, which goes through librbd and cephx like guest I/O), then read back with
the bindings once QEMU has stopped.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ceph.cluster import Cluster
from tests.conftest import READY
from tests.storage_rbd.conftest import MIB, read_image
from vmdriver.storage.base import SourceImage, Volume
from vmdriver.storage.disks import DiskRequest, DiskSource
from vmdriver.storage.rbd import RbdPool

BOOT_TIMEOUT_S = 180
RBD_MODULE = Path("/usr/lib/x86_64-linux-gnu/qemu/block-rbd.so")
DATA_DEV = "/machine/peripheral/datadev/virtio-backend"
RO_DEV = "/machine/peripheral/rodev/virtio-backend"


def _blockdev(pool: RbdPool, vol: Volume, node: str, secret_id: str, *,
              read_only: bool = False) -> str:
    proto = {**pool.protocol(vol.name, secret_id), "read-only": read_only}
    return json.dumps({"driver": "raw", "node-name": node, "file": proto, "read-only": read_only})


@pytest.fixture
def qemu_argv(rbd_pool: RbdPool, guest_dir: Path, work: Path) -> Iterator[tuple[list[str], str, str]]:
    """argv booting a chained RBD disk of disk.raw, plus an empty RBD data disk."""
    if shutil.which("qemu-system-x86_64") is None or not RBD_MODULE.exists():
        pytest.skip("qemu-system-x86_64 with the rbd block driver (qemu-block-extra) is missing")
    alloc = secrets.token_hex(4)
    with SourceImage.open(guest_dir / "disk.raw", fmt="raw", where="disk[0].source.image") as img:
        boot = rbd_pool.create_volume(rbd_pool.volume_request(
            DiskRequest(size=64 * MIB, chained=True, source=DiskSource(image="disk.raw")),
            alloc_id=alloc, task="vm", index=0, image=img))
    data = rbd_pool.create_volume(rbd_pool.volume_request(
        DiskRequest(size=16 * MIB), alloc_id=alloc, task="vm", index=1))
    ro = rbd_pool.create_volume(rbd_pool.volume_request(
        DiskRequest(size=4 * MIB, read_only=True), alloc_id=alloc, task="vm", index=2))
    assert ro.read_only
    key = rbd_pool.write_secret_file(work / "ceph.key")
    argv = [
        "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "256", "-nodefaults",
        "-display", "none", "-nic", "none",
        "-serial", f"file:{work / 'console.log'}",
        "-qmp", f"unix:{work / 'qmp.sock'},server=on,wait=off",
        "-object", f"secret,id=ceph0,file={key},format=base64",
        "-blockdev", _blockdev(rbd_pool, boot, "boot", "ceph0"),
        "-device", "virtio-blk-pci,drive=boot,id=bootdev,bootindex=1",
        "-blockdev", _blockdev(rbd_pool, data, "data", "ceph0"),
        "-device", "virtio-blk-pci,drive=data,id=datadev",
        # read_only as the core renders it: read-only nodes (librbd opens the image so).
        "-blockdev", _blockdev(rbd_pool, ro, "ro", "ceph0", read_only=True),
        "-device", "virtio-blk-pci,drive=ro,id=rodev",
    ]
    try:
        yield argv, alloc, data.name
    finally:
        rbd_pool.remove_task_volumes(alloc, "vm")


def _wait_console(path: Path, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if READY in text:
            return text
        if proc.poll() is not None:
            pytest.fail(f"QEMU exited ({proc.returncode}) before the guest was ready")
        time.sleep(0.5)
    pytest.fail(f"no {READY} within {BOOT_TIMEOUT_S} s")


def _qmp(work: Path) -> Any:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    qmp = QEMUMonitorProtocol(str(work / "qmp.sock"))
    qmp.connect()
    return qmp


def test_guest_boots_from_chained_rbd_and_data_disk_writes_reach_ceph(
        qemu_argv: tuple[list[str], str, str], rbd_pool: RbdPool, ceph_cluster: Cluster,
        admin: Any, work: Path) -> None:
    argv, alloc, data = qemu_argv
    # qemu-io prints its result on QEMU's stdout, not into the monitor's reply.
    with (work / "stdout.log").open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.PIPE)
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert ceph_cluster.client_key not in cmdline
        console = _wait_console(work / "console.log", proc)
        assert READY in console
        qmp = _qmp(work)
        try:
            # The device's own backend (-d, by QOM path): a second user of the node
            # would conflict with the device's write permission.
            replies = [qmp.cmd("human-monitor-command",
                               **{"command-line": f'qemu-io -d {dev} "write -P 0x5a 0 1M"'})
                       for dev in (DATA_DEV, RO_DEV)]
            assert replies[0] == ""
            assert "read-only" in str(replies[1])  # the read_only disk refuses writes
            # QEMU may close the socket before its reply to quit arrives, and then
            # qemu.qmp raises EOFError from quit or from close.
            with contextlib.suppress(EOFError, ConnectionError):
                qmp.cmd("quit")
        finally:
            with contextlib.suppress(EOFError, ConnectionError):
                qmp.close()
        assert proc.wait(timeout=30) == 0
        stdout = (work / "stdout.log").read_text()
        assert stdout.count("wrote 1048576/1048576 bytes") == 1, stdout  # data only
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        assert ceph_cluster.client_key not in stderr
    assert read_image(admin, ceph_cluster.pool, data, 0, MIB) == b"\x5a" * MIB
    assert read_image(admin, ceph_cluster.pool, data, MIB, 4096) == bytes(4096)
    assert read_image(admin, ceph_cluster.pool, f"{alloc}-vm-2", 0, MIB) == bytes(MIB)
