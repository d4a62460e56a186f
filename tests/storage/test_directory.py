"""Directory pools with real files and real qemu-img: every disk semantic of the virt driver."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmdriver.errors import PolicyError, SpecError
from vmdriver.storage import Pools, SourceImage, StorageError, parse_storage_pools
from vmdriver.storage.attach import drive_for
from vmdriver.storage.directory import DirectoryPool
from vmdriver.storage.disks import parse_disks

from .conftest import (
    MIB,
    disk,
    du_bytes,
    info,
    make_image,
    pool_files,
    qemu_img,
    read_guest_bytes,
    request,
    sha,
)

MARK = b"vmdriver-storage-mark" * 100


def test_empty_sparse_and_preallocated(pool: DirectoryPool) -> None:
    for i, (fmt, sparse) in enumerate([("raw", True), ("raw", False), ("qcow2", True),
                                       ("qcow2", False)]):
        vol = pool.create_volume(request(pool, disk(size="64MiB", format=fmt, sparse=sparse),
                                         index=i))
        assert vol.path is not None and vol.name == f"a1b2c3d4-web-{i}.{fmt}"
        assert info(vol.path, fmt)["virtual-size"] == 64 * MIB
        used = du_bytes(vol.path)
        if sparse:
            assert used < 2 * MIB, f"{fmt} sparse uses {used}"
        else:
            assert used >= 64 * MIB, f"{fmt} preallocated uses only {used}"


def test_defaults_follow_nomad_driver_virt(pool: DirectoryPool) -> None:
    # format unset: qcow2, thin; raw unset sparse: preallocated.
    req = request(pool, disk(size="8MiB"))
    assert (req.format, req.sparse) == ("qcow2", True)
    req = request(pool, disk(size="8MiB", format="raw"))
    assert (req.format, req.sparse) == ("raw", False)


@pytest.mark.parametrize(("src_fmt", "fmt", "sparse"), [
    ("qcow2", "raw", True), ("qcow2", "qcow2", True), ("raw", "qcow2", True),
    ("raw", "raw", False)])
def test_from_image_converted_then_grown(pool: DirectoryPool, work: Path, src_fmt: str,
                                         fmt: str, sparse: bool) -> None:
    img = make_image(work / f"src.{src_fmt}", src_fmt, 32 * MIB, data=MARK, at=5 * MIB)
    with SourceImage.open(img, where="disk[0].source.image") as src:
        vol = pool.create_volume(request(pool, disk(size="48MiB", format=fmt, sparse=sparse,
                                                    source={"image": "x"}), image=src))
    assert vol.path is not None and vol.size == 48 * MIB
    got = info(vol.path, fmt)
    assert got["format"] == fmt and got["virtual-size"] == 48 * MIB
    assert "backing-filename" not in got
    assert read_guest_bytes(vol.path, fmt, 5 * MIB, len(MARK)) == MARK
    if not sparse:
        assert du_bytes(vol.path) >= 48 * MIB


def test_size_defaults_to_the_source(pool: DirectoryPool, work: Path) -> None:
    img = make_image(work / "src.qcow2", "qcow2", 20 * MIB)
    with SourceImage.open(img, where="disk[0].source.image") as src:
        vol = pool.create_volume(request(pool, disk(source={"image": "x"}), image=src))
    assert vol.size == 20 * MIB


def test_never_shrinks_and_error_names_both_sizes(pool: DirectoryPool, work: Path) -> None:
    img = make_image(work / "src.qcow2", "qcow2", 2 << 30)
    with SourceImage.open(img, where="disk[0].source.image") as src, \
            pytest.raises(SpecError) as exc:
        pool.create_volume(request(pool, disk(size="1GiB", source={"image": "x"}), image=src))
    assert str(exc.value).startswith("disk[0].size: size 1 GiB is smaller than the source's "
                                     "2 GiB; a disk is never shrunk")
    assert pool_files(pool) == []


def test_full_clone_of_a_volume_then_grown(pool: DirectoryPool) -> None:
    make_image(pool.root / "golden.qcow2", "qcow2", 16 * MIB, data=MARK, at=MIB)
    vol = pool.create_volume(request(pool, disk(size="24MiB", source={"volume": "golden.qcow2"})))
    assert vol.path is not None and vol.backing is None
    got = info(vol.path, "qcow2")
    assert got["virtual-size"] == 24 * MIB and "backing-filename" not in got
    assert read_guest_bytes(vol.path, "qcow2", MIB, len(MARK)) == MARK
    # A real copy: writing the clone leaves the original alone.
    before = sha(pool.root / "golden.qcow2")
    vol.path.write_bytes(b"\0" * 4096)
    assert sha(pool.root / "golden.qcow2") == before


def test_clone_in_another_format_and_preallocated(pool: DirectoryPool) -> None:
    make_image(pool.root / "golden.raw", "raw", 16 * MIB, data=MARK, at=MIB)
    vol = pool.create_volume(request(pool, disk(format="raw", sparse=False,
                                                source={"volume": "golden.raw"})))
    assert vol.path is not None and du_bytes(vol.path) >= 16 * MIB
    vol2 = pool.create_volume(request(pool, disk(format="qcow2", source={"volume": "golden.raw"}),
                                      index=1))
    assert vol2.path is not None and info(vol2.path, "qcow2")["format"] == "qcow2"
    assert read_guest_bytes(vol2.path, "qcow2", MIB, len(MARK)) == MARK


def test_chained_on_image_shares_one_base_and_counts_users(pool: DirectoryPool,
                                                          work: Path) -> None:
    img = make_image(work / "src.qcow2", "qcow2", 32 * MIB, data=MARK, at=3 * MIB)
    d = disk(size="64MiB", chained=True, source={"image": "x"})
    vols = []
    with SourceImage.open(img, where="disk[0].source.image") as src:
        for alloc in ("aaaaaaaa11", "bbbbbbbb22", "cccccccc33"):
            vols.append(pool.create_volume(request(pool, d, alloc=alloc, image=src)))
    bases = os.listdir(pool.root / ".vmdriver" / "bases")
    assert len(bases) == 1 and {v.backing for v in vols} == {bases[0]}
    base = pool.root / ".vmdriver" / "bases" / bases[0]
    for v in vols:
        assert v.path is not None
        got = info(v.path, "qcow2")
        assert got["virtual-size"] == 64 * MIB
        assert got["backing-filename"] == str(base)
        assert got["backing-filename-format"] == "qcow2"
        assert read_guest_bytes(v.path, "qcow2", 3 * MIB, len(MARK)) == MARK
    assert oct(base.stat().st_mode & 0o777) == "0o400"
    pool.remove_task_volumes("aaaaaaaa11", "web")
    pool.remove_task_volumes("bbbbbbbb22", "web")
    assert base.exists()
    assert pool.remove_task_volumes("cccccccc33", "web") == ["cccccccc-web-0.qcow2"]
    assert not base.exists()
    assert pool_files(pool) == []


def test_chained_on_image_content_not_path(pool: DirectoryPool, work: Path) -> None:
    """Two copies of one image share a base; a changed image gets its own."""
    a = make_image(work / "a.qcow2", "qcow2", 8 * MIB, data=MARK)
    b = work / "b.qcow2"
    b.write_bytes(a.read_bytes())
    d = disk(chained=True, source={"image": "x"})
    for i, path in enumerate((a, b)):
        with SourceImage.open(path, where="x") as src:
            pool.create_volume(request(pool, d, index=i, image=src))
    assert len(os.listdir(pool.root / ".vmdriver" / "bases")) == 1
    make_image(a, "qcow2", 8 * MIB, data=b"changed" + MARK)  # rewritten in place
    with SourceImage.open(a, where="x") as src:
        vol = pool.create_volume(request(pool, d, index=2, image=src))
    assert len(os.listdir(pool.root / ".vmdriver" / "bases")) == 2
    assert vol.path is not None
    assert read_guest_bytes(vol.path, "qcow2", 0, 7) == b"changed"


def test_chained_on_an_operator_volume(pool: DirectoryPool) -> None:
    make_image(pool.root / "focal.img", "raw", 8 * MIB, data=MARK)
    vol = pool.create_volume(request(pool, disk(size="16MiB", chained=True,
                                                source={"volume": "focal.img"})))
    assert vol.path is not None and vol.backing == "focal.img"
    got = info(vol.path, "qcow2")
    assert got["backing-filename"] == str(pool.root / "focal.img")
    assert got["backing-filename-format"] == "raw"
    pool.remove_task_volumes("a1b2c3d4e5", "web")
    assert (pool.root / "focal.img").exists()  # the operator's, never removed


def test_chaining_on_a_task_volume_is_refused(pool: DirectoryPool) -> None:
    pool.create_volume(request(pool, disk(size="1MiB"), alloc="ffffffff00"))
    with pytest.raises(SpecError, match=r"^disk\[0\]\.source\.volume: a chained disk needs a "
                       "base that never changes"):
        pool.create_volume(request(pool, disk(chained=True, source={
            "volume": "ffffffff-web-0.qcow2"})))


def test_names_exist_ok_and_listing(pool: DirectoryPool) -> None:
    d = disk(size="1MiB")
    v0 = pool.create_volume(request(pool, d, index=0))
    pool.create_volume(request(pool, disk(size="2MiB", format="raw"), index=1))
    pool.create_volume(request(pool, d, index=0, task="web-1"))  # a task whose name extends
    with pytest.raises(StorageError, match=r"volume 'a1b2c3d4-web-0\.qcow2' already exists"):
        pool.create_volume(request(pool, d, index=0))
    again = pool.create_volume(request(pool, d, index=0), exist_ok=True)
    assert again.reused and again.size == v0.size and again.path == v0.path
    fresh = DirectoryPool("local", pool.root)  # as after a restart
    assert [(v.name, v.size) for v in fresh.task_volumes("a1b2c3d4e5", "web")] == [
        ("a1b2c3d4-web-0.qcow2", MIB), ("a1b2c3d4-web-1.raw", 2 * MIB)]
    assert fresh.remove_task_volumes("a1b2c3d4e5", "web") == [
        "a1b2c3d4-web-0.qcow2", "a1b2c3d4-web-1.raw"]
    assert pool_files(pool) == ["a1b2c3d4-web-1-0.qcow2"]
    fresh.close()


def test_failed_task_start_removes_the_volumes_it_made(work: Path) -> None:
    cfg = parse_storage_pools({"directory": {"local": {"path": str(work / "pool")}}}, "h")
    disks = parse_disks([{"size": "4MiB", "primary": True}, {"size": "4MiB"},
                         {"source": {"volume": "missing.qcow2"}}])
    with Pools(cfg) as pools:
        with pytest.raises(StorageError, match=r"^disk\[2\]\.source\.volume: volume "
                           "'missing.qcow2' does not exist"):
            pools.create_task_volumes("a1b2c3d4e5", "web", disks)
        assert os.listdir(work / "pool") == [".vmdriver"]


def test_pools_check_refuses_unknown_pool(work: Path) -> None:
    cfg = parse_storage_pools({"directory": {"local": {"path": str(work / "pool")}}}, "h")
    with Pools(cfg) as pools, pytest.raises(SpecError) as exc:
        pools.check(parse_disks([{"size": 1, "pool": "elsewhere"}]))
    assert str(exc.value) == ("disk[0].pool: unknown storage pool (got 'elsewhere'; "
                              "allowed: local)")


def test_killed_creator_leftovers_are_swept(pool: DirectoryPool) -> None:
    tmp = pool.root / ".vmdriver" / "tmp"
    (tmp / "x.qcow2.999999999.0123abcd.part").write_bytes(b"half")
    (tmp / f"y.qcow2.{os.getpid()}.0123abcd.part").write_bytes(b"mine, in progress")
    DirectoryPool("local", pool.root).close()
    assert sorted(os.listdir(tmp)) == [f"y.qcow2.{os.getpid()}.0123abcd.part"]


def _artifact_overlay(work: Path, name: str) -> tuple[Path, Path]:
    """What vmdriver.artifacts puts in a task dir for a qcow2 artifact: an overlay on the cache."""
    cache = work / "cache"
    cache.mkdir(exist_ok=True)
    cached = cache / "img.qcow2"
    if not cached.exists():
        make_image(cached, "qcow2", 16 * MIB, data=MARK, at=2 * MIB)
    task = work / name
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(cached), str(task))
    return task, cached


def test_source_image_with_a_checked_backing_chain(pool: DirectoryPool, work: Path) -> None:
    task_img, cached = _artifact_overlay(work, "task1.qcow2")
    other_img, _ = _artifact_overlay(work, "task2.qcow2")
    flat = disk(source={"image": "x"})
    chained = disk(chained=True, source={"image": "x"})
    with SourceImage.open(task_img, where="x", allow_backing=True) as src:
        assert len(src.chain) == 1
        vol = pool.create_volume(request(pool, flat, index=0, image=src))
        ch1 = pool.create_volume(request(pool, chained, index=1, image=src))
    with SourceImage.open(other_img, where="x", allow_backing=True) as src:
        ch2 = pool.create_volume(request(pool, chained, index=2, image=src))
    assert vol.path is not None and "backing-filename" not in info(vol.path, "qcow2")
    assert read_guest_bytes(vol.path, "qcow2", 2 * MIB, len(MARK)) == MARK
    assert ch1.backing == ch2.backing  # same chain content: one base
    assert ch1.backing is not None
    base = pool.root / ".vmdriver" / "bases" / ch1.backing
    assert "backing-filename" not in info(base, "qcow2")  # flattened: free of the cache
    cached.unlink()
    assert ch1.path is not None
    assert read_guest_bytes(ch1.path, "qcow2", 2 * MIB, len(MARK)) == MARK


def test_relative_backing_name_is_refused(work: Path) -> None:
    make_image(work / "b.raw", "raw", MIB)
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "b.raw", str(work / "o.qcow2"))
    with pytest.raises(PolicyError, match="backing file must be named by an absolute path"):
        SourceImage.open(work / "o.qcow2", where="x", allow_backing=True)


def test_three_disks_of_a_virt_task_and_a_restart(work: Path, guest_dir: Path) -> None:
    """Issue 11's job: a chained primary from an image, an empty data disk, a CD-ROM from an ISO."""
    cfg = parse_storage_pools({"directory": {"local": {"path": str(work / "pool")}}}, "h")
    disks = parse_disks([
        {"size": "1GiB", "chained": True, "primary": True,
         "source": {"image": "local/disk.qcow2"}},
        {"size": "256MiB", "devname": "data"},
        {"kind": "cdrom", "source": {"image": "local/guest.iso"}},
    ])
    assert [d.primary for d in disks] == [True, False, False]
    with Pools(cfg) as pools, \
            SourceImage.open(guest_dir / "disk.qcow2", where="disk[0].source.image") as img, \
            SourceImage.open(guest_dir / "guest.iso", fmt="raw", where="disk[2].source.image") \
            as iso:
        pools.check(disks)
        vols = pools.create_task_volumes("0123abcd99", "vm", disks, {0: img, 2: iso})
        again = pools.create_task_volumes("0123abcd99", "vm", disks, {0: img, 2: iso},
                                          exist_ok=True)  # the task restarted: same disks
    assert [(v.name, v.format, v.read_only) for v in vols if v] == [
        ("0123abcd-vm-0.qcow2", "qcow2", False), ("0123abcd-vm-1.qcow2", "qcow2", False),
        ("0123abcd-vm-2.raw", "raw", True)]
    assert all(v is not None and v.reused for v in again)
    cd = vols[2]
    assert cd is not None and cd.path is not None
    assert sha(cd.path) == sha(guest_dir / "guest.iso")
    with Pools(cfg) as pools:
        assert len(pools.remove_task_volumes("0123abcd99", "vm")) == 3
    assert os.listdir(work / "pool" / ".vmdriver" / "bases") == []


def test_volumes_map_to_spec_drives(work: Path) -> None:
    cfg = parse_storage_pools({"directory": {"local": {"path": str(work / "pool")}}}, "h")
    disks = parse_disks([{"size": "8MiB", "primary": True, "devname": "root"},
                         {"size": "8MiB", "format": "raw", "bus_type": "scsi", "read_only": True}])
    with Pools(cfg) as pools:
        vols = pools.create_task_volumes("0123abcd99", "vm", disks)
        assert pools.local_roots() == ((work / "pool").resolve(),)
    drives = [drive_for(d, v, i) for i, (d, v) in enumerate(zip(disks, vols, strict=True))
              if v is not None]
    assert [(d.id, d.bus.value, d.boot_index, d.serial, d.read_only) for d in drives] == [
        ("disk0", "virtio", 1, "root", False), ("disk1", "scsi", None, "sda", True)]
    assert [d.medium.model_dump() if d.medium else None for d in drives] == [
        {"kind": "file", "path": str(vols[0].path if vols[0] else ""), "format": "qcow2",
         "overlay_on": None},
        {"kind": "file", "path": str(vols[1].path if vols[1] else ""), "format": "raw",
         "overlay_on": None}]
