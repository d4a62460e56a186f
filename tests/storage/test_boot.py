"""The test guest boots from a chained volume of a directory pool; the shared base stays intact.

QEMU is launched here with a plain argv (TCG): the runtime is being rewritten, and
what is under test is the volume, not the supervisor.
"""

from __future__ import annotations

import hashlib
import os
import selectors
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import READY
from vmdriver.storage import SourceImage
from vmdriver.storage.directory import DirectoryPool

from .conftest import disk, info, request

pytestmark = pytest.mark.e2e
BOOT_TIMEOUT_S = 180


def _sha(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _boot_until_ready(volume: Path, base: Path) -> str:
    """Boot from ``volume`` (qcow2 on ``base``), return the console up to the readiness line."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    argv = [
        qemu, "-machine", "pc,accel=tcg", "-m", "256", "-nodefaults", "-no-user-config",
        "-display", "none", "-serial", "stdio", "-nic", "none",
        "-blockdev", f"driver=file,node-name=f0,filename={volume}",
        # The base is opened by QEMU through the overlay's backing link, read-only.
        "-blockdev", "driver=qcow2,node-name=d0,file=f0",
        "-device", "virtio-blk-pci,drive=d0,serial=vda,bootindex=1",
    ]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    console = b""
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while READY.encode() not in console and time.monotonic() < deadline:
            if sel.select(timeout=1.0):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                console += chunk
        # While QEMU runs, the base is open read-only behind the overlay.
        opened = {os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                  for fd in os.listdir(f"/proc/{proc.pid}/fd")}
        assert str(base) in opened and str(volume) in opened
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    text = console.decode(errors="replace")
    assert READY in text, f"no readiness line; console tail: {text[-800:]!r}; stderr: {err!r}"
    return text


def test_guest_boots_from_a_chained_volume(guest_dir: Path, work: Path) -> None:
    image = guest_dir / "disk.qcow2"
    image_sha = _sha(image)
    pool = DirectoryPool("local", work / "pool")
    try:
        with SourceImage.open(image, where="disk[0].source.image") as src:
            vol = pool.create_volume(request(pool, disk(size="64MiB", chained=True,
                                                        source={"image": "x"}), image=src))
        assert vol.path is not None and vol.backing is not None
        base = pool.root / ".vmdriver" / "bases" / vol.backing
        base_sha = _sha(base)
        line = next(x for x in _boot_until_ready(vol.path, base).splitlines() if READY in x)
        assert line.startswith(READY)
        assert _sha(base) == base_sha, "the shared base was modified by the guest"
        assert _sha(image) == image_sha
        assert info(vol.path, "qcow2")["backing-filename"] == str(base)
        assert pool.remove_task_volumes("a1b2c3d4e5", "web") == [vol.name]
        assert not base.exists()
    finally:
        pool.close()
