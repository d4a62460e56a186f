"""Fixtures for storage tests: pools in temp dirs, small real images, mounted filesystems."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import short_tmp
from vmdriver.storage import DiskRequest, SourceImage, VolumeRequest
from vmdriver.storage.directory import DirectoryPool
from vmdriver.storage.disks import parse_disk

MIB = 1 << 20


@pytest.fixture
def work() -> Iterator[Path]:
    """A private temp dir (on the root filesystem: ext4 here, no reflink)."""
    with short_tmp("vmd-st-") as path:
        yield path


@pytest.fixture
def pool(work: Path) -> Iterator[DirectoryPool]:
    p = DirectoryPool("local", work / "pool")
    try:
        yield p
    finally:
        p.close()


def qemu_img(*args: str) -> str:
    return subprocess.run(("qemu-img", *args), check=True, capture_output=True,
                          text=True).stdout


def make_image(path: Path, fmt: str, size: int, *, data: bytes = b"", at: int = 0) -> Path:
    """A real image of ``size`` bytes holding ``data`` at offset ``at`` (holes elsewhere)."""
    raw = path if fmt == "raw" else path.with_name(path.name + ".src.raw")
    with raw.open("wb") as f:
        f.truncate(size)
        if data:
            f.seek(at)
            f.write(data)
    if fmt != "raw":
        qemu_img("convert", "-f", "raw", "-O", fmt, str(raw), str(path))
        raw.unlink()
    return path


def read_guest_bytes(path: Path, fmt: str, at: int, n: int) -> bytes:
    """The bytes a guest would read at ``at`` (through the whole backing chain)."""
    out = Path(tempfile.mkdtemp(prefix="vmd-rd-", dir="/tmp"))
    try:
        raw = out / "x.raw"
        qemu_img("convert", "-f", fmt, "-O", "raw", str(path), str(raw))
        with raw.open("rb") as f:
            f.seek(at)
            return f.read(n)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def info(path: Path, fmt: str) -> dict[str, object]:
    import json
    return json.loads(qemu_img("info", "--output=json", "-U", "-f", fmt, str(path)))  # type: ignore[no-any-return]


def du_bytes(path: Path) -> int:
    """Bytes the file really occupies (what `du` shows)."""
    return os.stat(path).st_blocks * 512


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disk(**fields: object) -> DiskRequest:
    return parse_disk(fields, "disk[0]")


def request(pool: DirectoryPool, d: DiskRequest, *, index: int = 0, alloc: str = "a1b2c3d4e5",
            task: str = "web", image: SourceImage | None = None) -> VolumeRequest:
    return pool.volume_request(d, alloc_id=alloc, task=task, index=index, image=image)


def pool_files(pool: DirectoryPool) -> list[str]:
    """Everything in the pool: volumes, and what .vmdriver holds besides locks and hash memos."""
    out = []
    for dirpath, _dirs, files in os.walk(pool.root):
        rel = os.path.relpath(dirpath, pool.root)
        if rel.startswith(".vmdriver/locks") or rel.startswith(".vmdriver/memo"):
            continue
        out += [os.path.normpath(os.path.join(rel, f)) for f in files]
    return sorted(out)


@pytest.fixture
def tmpfs(work: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs mounted for the test and unmounted after."""
    mnt = work / "small"
    mnt.mkdir()
    try:
        subprocess.run(("mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(mnt)),
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield mnt
    finally:
        subprocess.run(("umount", str(mnt)), check=False, capture_output=True)


@pytest.fixture
def xfs(work: Path) -> Iterator[Path]:
    """A 512 MiB XFS (reflink on) on a loop device, for FICLONE."""
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed: no filesystem with reflink to test on")
    img = work / "xfs.img"
    mnt = work / "xfs"
    mnt.mkdir()
    with img.open("wb") as f:
        f.truncate(512 * MIB)
    try:
        subprocess.run(("mkfs.xfs", "-q", "-m", "reflink=1", str(img)), check=True,
                       capture_output=True)
        subprocess.run(("mount", "-o", "loop", str(img), str(mnt)), check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount an XFS loop image here: {exc}")
    try:
        yield mnt
    finally:
        subprocess.run(("umount", str(mnt)), check=False, capture_output=True)
