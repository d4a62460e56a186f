"""Safety: names and symlinks cannot leave the pool, sources are self-contained, races and
full disks leave nothing half-made."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmdriver.errors import PolicyError, SpecError
from vmdriver.storage import DiskSource, SourceImage, StorageError, StorageFull
from vmdriver.storage.directory import DirectoryPool

from .conftest import MIB, disk, info, make_image, pool_files, qemu_img, read_guest_bytes, request

HOSTILE = ["../etc/passwd", "/etc/passwd", "..", ".", ".vmdriver/bases/x", "a\x00b",
           "x" * 300, "new\nline", ".hidden"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_source_volume_names(pool: DirectoryPool, name: str) -> None:
    # Built without the parser's checks: the pool itself must refuse the name.
    d = disk(size=1).model_copy(update={"source": DiskSource.model_construct(volume=name)})
    with pytest.raises(SpecError) as exc:
        request(pool, d)
    assert str(exc.value).startswith("disk[0].source.volume: volume name not allowed")


@pytest.mark.parametrize("task", ["a/b", "../x", "x" * 200, "tab\there", "nul\x00"])
def test_hostile_task_names(pool: DirectoryPool, task: str) -> None:
    with pytest.raises(SpecError):
        pool.create_volume(request(pool, disk(size="1MiB"), task=task))
    assert pool_files(pool) == []


def test_symlinked_source_volume_is_refused(pool: DirectoryPool, work: Path) -> None:
    secret = make_image(work / "outside.raw", "raw", MIB, data=b"host secret")
    (pool.root / "golden.raw").symlink_to(secret)
    for chained in (False, True):
        with pytest.raises(StorageError, match="it is a symbolic link"):
            pool.create_volume(request(pool, disk(chained=chained,
                                                  source={"volume": "golden.raw"})))
    assert pool_files(pool) == ["golden.raw"]  # the planted link only


def test_symlink_planted_at_a_volume_name(pool: DirectoryPool, work: Path) -> None:
    victim = work / "victim"
    victim.write_bytes(b"untouched")
    (pool.root / "a1b2c3d4-web-0.qcow2").symlink_to(victim)
    with pytest.raises(StorageError, match="already exists"):
        pool.create_volume(request(pool, disk(size="1MiB")))
    with pytest.raises(StorageError, match="it is a symbolic link"):
        pool.create_volume(request(pool, disk(size="1MiB")), exist_ok=True)
    assert victim.read_bytes() == b"untouched"


@pytest.mark.parametrize("inner", [".vmdriver", ".vmdriver/tmp", ".vmdriver/bases"])
def test_symlinked_metadata_dirs_are_refused(work: Path, inner: str) -> None:
    root = work / "pool"
    DirectoryPool("p", root).close()
    outside = work / "outside"
    outside.mkdir()
    target = root / inner
    os.rename(target, work / "moved")
    target.symlink_to(outside)
    with pytest.raises(StorageError, match="cannot be used: a symbolic link"):
        DirectoryPool("p", root)
    assert os.listdir(outside) == []


def test_every_volume_path_stays_in_the_pool(pool: DirectoryPool, work: Path) -> None:
    img = make_image(work / "i.qcow2", "qcow2", 4 * MIB)
    with SourceImage.open(img, where="x") as src:
        vols = [pool.create_volume(request(pool, disk(size="4MiB"), index=0)),
                pool.create_volume(request(pool, disk(chained=True, source={"image": "x"}),
                                           index=1, image=src))]
    for v in vols:
        assert v.path is not None and v.path.resolve().parent == pool.root
        assert not v.path.is_symlink() and oct(v.path.stat().st_mode & 0o777) == "0o600"


def test_source_image_with_backing_file_is_refused(pool: DirectoryPool, work: Path) -> None:
    base = make_image(work / "base.raw", "raw", MIB)
    over = work / "over.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(over))
    with pytest.raises(PolicyError, match=r"^disk\[0\].source.image: image has a backing file"):
        SourceImage.open(over, where="disk[0].source.image")
    # The same file placed in the pool is no better as a source volume.
    os.rename(over, pool.root / "over.qcow2")
    with pytest.raises(PolicyError, match="image has a backing file"):
        pool.create_volume(request(pool, disk(source={"volume": "over.qcow2"})))
    assert pool_files(pool) == ["over.qcow2"]


def test_source_image_with_external_data_file_is_refused(work: Path) -> None:
    img = work / "df.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={work / 'data.raw'}", str(img),
             "1M")
    with pytest.raises(PolicyError, match="keep data in other files"):
        SourceImage.open(img, where="disk[0].source.image")


def test_symlinked_source_image_is_not_followed(work: Path) -> None:
    img = make_image(work / "real.raw", "raw", MIB)
    (work / "link.raw").symlink_to(img)
    with pytest.raises(SpecError, match="image cannot be opened"):
        SourceImage.open(work / "link.raw", where="x")


def test_explicit_format_is_never_probed(pool: DirectoryPool, work: Path) -> None:
    """A raw image whose bytes look like a qcow2 naming /etc/passwd stays raw bytes."""
    fake = work / "fake.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", str(fake), "1M")
    raw_bytes = fake.read_bytes()
    with pytest.raises(PolicyError):
        SourceImage.open(fake, where="x")  # probed: a qcow2 with a backing file
    with SourceImage.open(fake, fmt="raw", where="x") as src:
        assert src.format == "raw"
        vol = pool.create_volume(request(pool, disk(format="raw", source={"image": "x"}),
                                         image=src))
    assert vol.path is not None
    assert read_guest_bytes(vol.path, "raw", 0, len(raw_bytes)) == raw_bytes
    assert "backing-filename" not in info(vol.path, "raw")


_RACER = """
import sys, time
from pathlib import Path
from vmdriver.storage import SourceImage
from vmdriver.storage.directory import DirectoryPool
from vmdriver.storage.disks import parse_disk
root, image, alloc, start = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
pool = DirectoryPool("local", Path(root))
d = parse_disk({"chained": True, "source": {"image": "x"}}, "disk[0]")
with SourceImage.open(Path(image), where="x") as src:
    req = pool.volume_request(d, alloc_id=alloc, task="web", index=0, image=src)
    time.sleep(max(0.0, start - time.time()))
    vol = pool.create_volume(req)
print(vol.backing)
"""


def test_two_processes_create_one_base(pool: DirectoryPool, work: Path) -> None:
    # Big enough that copying the base takes a while: the two creators overlap.
    img = make_image(work / "big.raw", "raw", 256 * MIB, data=os.urandom(96 * MIB), at=MIB)
    bases = pool.root / ".vmdriver" / "bases"
    seen: dict[str, set[int]] = {}
    stop = threading.Event()

    def watch() -> None:
        # Anything visible under bases/ must already be whole.
        while not stop.is_set():
            for name in os.listdir(bases):
                with contextlib.suppress(FileNotFoundError):
                    seen.setdefault(name, set()).add((bases / name).stat().st_size)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.time() + 1.5
    procs = [subprocess.Popen((sys.executable, "-c", _RACER, str(pool.root), str(img), alloc,
                               str(start)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for alloc in ("aaaaaaaa00", "bbbbbbbb00")]
    outs = [p.communicate(timeout=120) for p in procs]
    stop.set()
    watcher.join()
    assert [p.returncode for p in procs] == [0, 0], outs
    backing = {o[0].strip() for o in outs}
    assert len(backing) == 1 and os.listdir(bases) == [backing.pop()]
    assert seen and all(sizes == {256 * MIB} for sizes in seen.values()), seen
    refs = pool.root / ".vmdriver" / "refs" / os.listdir(bases)[0]
    assert sorted(os.listdir(refs)) == ["aaaaaaaa-web-0.qcow2", "bbbbbbbb-web-0.qcow2"]
    assert os.listdir(pool.root / ".vmdriver" / "tmp") == []


def _usage(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.mark.parametrize("what", ["preallocated", "image", "clone", "base"])
def test_disk_full_fails_clearly_and_leaves_nothing(tmpfs: Path, work: Path, what: str) -> None:
    pool = DirectoryPool("small", tmpfs / "pool")
    try:
        before = _usage(tmpfs)
        big = make_image(work / "big.raw", "raw", 96 * MIB, data=os.urandom(90 * MIB))
        with SourceImage.open(big, where="x") as src, pytest.raises(StorageFull) as exc:
            if what == "preallocated":
                pool.create_volume(request(pool, disk(size="128MiB", format="raw")))
            elif what == "image":
                pool.create_volume(request(pool, disk(source={"image": "x"}), image=src))
            elif what == "base":
                pool.create_volume(request(pool, disk(chained=True, source={"image": "x"}),
                                           image=src))
            else:
                # A golden volume that fits, and a clone of it that cannot.
                make_image(pool.root / "golden.raw", "raw", 40 * MIB,
                           data=os.urandom(40 * MIB))
                before = _usage(tmpfs)
                pool.create_volume(request(pool, disk(format="raw",
                                                      source={"volume": "golden.raw"})))
        assert str(exc.value).startswith("disk[0]: no space left in the pool to ")
        assert [f for f in pool_files(pool) if f != "golden.raw"] == []
        assert _usage(tmpfs) - before < MIB
    finally:
        pool.close()


def test_remembered_facts_never_hide_a_rewritten_volume(pool: DirectoryPool, work: Path) -> None:
    golden = make_image(pool.root / "golden.qcow2", "qcow2", 4 * MIB)
    pool.create_volume(request(pool, disk(source={"volume": "golden.qcow2"}), index=0))
    ino = golden.stat().st_ino
    # Rewritten in place (same inode) into an overlay naming a host file.
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", str(golden), "4M")
    assert golden.stat().st_ino == ino
    with pytest.raises(PolicyError, match="image has a backing file"):
        pool.create_volume(request(pool, disk(source={"volume": "golden.qcow2"}), index=1))


def test_a_reused_volume_may_not_point_outside_the_pool(pool: DirectoryPool) -> None:
    name = "a1b2c3d4-web-0.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd",
             str(pool.root / name), "1M")
    with pytest.raises(StorageError, match="has a backing file outside the pool"):
        pool.create_volume(request(pool, disk(size="1MiB")), exist_ok=True)
    with pytest.raises(StorageError, match="has a backing file outside the pool"):
        pool.task_volumes("a1b2c3d4e5", "web")
