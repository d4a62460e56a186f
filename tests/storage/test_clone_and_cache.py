"""Reflink clones on a filesystem that has them, the content-hash memo, and base collection."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from vmdriver.storage import SourceImage, fsutil
from vmdriver.storage.directory import DirectoryPool

from .conftest import MIB, disk, make_image, pool_files, request, sha


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def test_full_clone_is_a_reflink_on_xfs(xfs: Path) -> None:
    pool = DirectoryPool("x", xfs / "pool")
    try:
        make_image(pool.root / "golden.raw", "raw", 128 * MIB, data=os.urandom(100 * MIB))
        subprocess.run(("sync",), check=True)
        free = _free(xfs)
        vol = pool.create_volume(request(pool, disk(format="raw", sparse=True,
                                                    source={"volume": "golden.raw"})))
        subprocess.run(("sync",), check=True)
        assert vol.path is not None and sha(vol.path) == sha(pool.root / "golden.raw")
        # 100 MiB of data cloned, almost no space used: the extents are shared.
        assert free - _free(xfs) < 8 * MIB
        shared = subprocess.run(("filefrag", "-v", str(vol.path)), capture_output=True,
                                text=True, check=False).stdout
        assert "shared" in shared
    finally:
        pool.close()


def test_clone_without_reflink_keeps_holes(work: Path) -> None:
    src = make_image(work / "s.raw", "raw", 256 * MIB, data=b"x" * MIB, at=64 * MIB)
    dst = work / "d.raw"
    with src.open("rb") as s, dst.open("wb") as d:
        how = fsutil.clone(s.fileno(), d.fileno(), where="t")
    assert how == "copy"  # ext4 has no reflink
    assert dst.stat().st_size == 256 * MIB and sha(dst) == sha(src)
    assert dst.stat().st_blocks * 512 <= 2 * MIB


def test_content_hash_ignores_holes_but_not_bytes(work: Path) -> None:
    a = make_image(work / "a.raw", "raw", 8 * MIB, data=b"abc", at=3 * MIB)
    b = work / "b.raw"
    b.write_bytes(a.read_bytes())  # same bytes, no holes
    c = make_image(work / "c.raw", "raw", 8 * MIB, data=b"abd", at=3 * MIB)
    d = make_image(work / "d.raw", "raw", 8 * MIB + 1, data=b"abc", at=3 * MIB)

    def h(p: Path) -> str:
        with p.open("rb") as f:
            return fsutil.content_sha256(f.fileno())

    assert h(a) == h(b)
    assert len({h(a), h(c), h(d)}) == 3


def test_chained_creation_hashes_an_image_once(pool: DirectoryPool, work: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    img = make_image(work / "i.raw", "raw", 64 * MIB, data=os.urandom(8 * MIB))
    calls: list[int] = []
    real = fsutil.content_sha256

    def counting(fd: int) -> str:
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(fsutil, "content_sha256", counting)
    d = disk(chained=True, source={"image": "x"})
    for i in range(3):
        with SourceImage.open(img, where="x") as src:
            pool.create_volume(request(pool, d, index=i, image=src))
    assert len(calls) == 1
    fresh = DirectoryPool("local", pool.root)  # the memo is on disk: a restart keeps it
    with SourceImage.open(img, where="x") as src:
        fresh.create_volume(request(fresh, d, index=3, image=src))
    assert len(calls) == 1
    os.utime(img)  # touched: ctime changes, so it is hashed again
    with SourceImage.open(img, where="x") as src:
        fresh.create_volume(request(fresh, d, index=4, image=src))
    assert len(calls) == 2
    fresh.close()


def test_collect_bases_after_a_crash(pool: DirectoryPool, work: Path) -> None:
    img = make_image(work / "i.qcow2", "qcow2", 4 * MIB)
    with SourceImage.open(img, where="x") as src:
        vol = pool.create_volume(request(pool, disk(chained=True, source={"image": "x"}),
                                         image=src))
    assert pool.collect_bases() == []  # in use
    assert vol.path is not None
    vol.path.unlink()  # as if a crash came between removing the volume and its ref
    assert pool.collect_bases() == [vol.backing]
    assert pool_files(pool) == []


def test_chained_creation_is_fast_once_the_base_exists(pool: DirectoryPool, work: Path) -> None:
    img = make_image(work / "i.raw", "raw", 2 << 30, data=os.urandom(4 * MIB))
    d = disk(size="4GiB", chained=True, source={"image": "x"})
    with SourceImage.open(img, where="x") as src:
        pool.create_volume(request(pool, d, index=0, image=src))
        times = []
        for i in range(1, 6):
            t = time.perf_counter()
            pool.create_volume(request(pool, d, index=i, image=src))
            times.append(time.perf_counter() - t)
    assert sorted(times)[2] < 0.25, times  # generous: shared 2-core host; bench has the number
