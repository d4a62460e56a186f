"""The shared cache: hits download nothing, concurrent fetches download once, LRU eviction,
overlays never write the cached copy, disk full leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.artifacts.artifact_server import ArtifactServer
from tests.artifacts.helpers import fetch, files, leftovers, sha256
from vmdriver.artifacts import ArtifactCache, ProgressEvent
from vmdriver.artifacts.image import image_info
from vmdriver.errors import ArtifactError

REPO = Path(__file__).resolve().parents[2]


def test_second_fetch_downloads_nothing(server: ArtifactServer, tmp_path: Path,
                                        small_qcow2: Path) -> None:
    data = small_qcow2.read_bytes()
    url = server.add("/small.qcow2", data) + f"?checksum={sha256(data)}"
    cache = ArtifactCache(tmp_path / "cache")
    fetch(url, tmp_path / "t1", cache=cache)
    events: list[ProgressEvent] = []
    [out] = fetch(url, tmp_path / "t2", cache=cache, events=events)
    assert server.hits["/small.qcow2"] == 1
    assert next(e.phase for e in events if e.message) == "cached"
    assert not any(e.phase == "download" for e in events)
    # A qcow2 image becomes an overlay over the read-only cached copy.
    info = image_info(out)
    blob = cache.root / "entries" / f"sha256-{hashlib.sha256(data).hexdigest()}" / "blob"
    assert info.format == "qcow2" and info.backing == str(blob) and info.backing_format == "qcow2"
    assert os.stat(blob).st_mode & 0o777 == 0o444
    assert os.stat(out).st_size < 1 << 20


def test_writes_go_to_the_overlay_never_the_cache(server: ArtifactServer, tmp_path: Path,
                                                  small_qcow2: Path) -> None:
    data = small_qcow2.read_bytes()
    url = server.add("/small.qcow2", data) + f"?checksum={sha256(data)}"
    cache = ArtifactCache(tmp_path / "cache")
    [out] = fetch(url, tmp_path / "t1", cache=cache)
    subprocess.run(("qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 1M", str(out)), check=True,
                   capture_output=True)
    [blob] = (cache.root / "entries").glob("*/blob")
    assert blob.read_bytes() == data
    [again] = fetch(url, tmp_path / "t2", cache=cache)
    head = subprocess.run(("qemu-io", "-f", "qcow2", "-c", "read -P 0x56 0 512", str(again)),
                          capture_output=True, text=True, check=False).stdout
    assert "Pattern verification failed" in head  # the second task sees the pristine image


def test_raw_images_are_copied_not_overlaid(server: ArtifactServer, tmp_path: Path) -> None:
    body = b"RAWDISK" + bytes(3 << 20)
    url = server.add("/disk.raw", body) + f"?checksum={sha256(body)}"
    cache = ArtifactCache(tmp_path / "cache")
    [out] = fetch(url, tmp_path / "t1", cache=cache)
    assert image_info(out).format == "raw" and out.read_bytes() == body
    assert os.stat(out).st_blocks * 512 < 1 << 20  # the copy kept the holes
    out.write_bytes(b"changed")
    [blob] = (cache.root / "entries").glob("*/blob")
    assert blob.read_bytes() == body


def test_concurrent_threads_download_once(server: ArtifactServer, tmp_path: Path) -> None:
    body = os.urandom(1 << 20)
    url = server.add("/disk.img", body, delay=0.05) + f"?checksum={sha256(body)}"
    cache = ArtifactCache(tmp_path / "cache")
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            fetch(url, tmp_path / f"t{i}", cache=cache)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert server.hits["/disk.img"] == 1
    for i in range(3):
        assert (tmp_path / f"t{i}/local/disk.img").read_bytes() == body


_CHILD = """
import sys
from pathlib import Path
from vmdriver.artifacts import ArtifactCache, fetch_artifacts
from vmdriver.spec import ArtifactSpec
fetch_artifacts((ArtifactSpec(source=sys.argv[1]),), Path(sys.argv[2]), Path(sys.argv[2]),
                cache=ArtifactCache(Path(sys.argv[3])))
"""


def test_concurrent_processes_download_once(server: ArtifactServer, tmp_path: Path) -> None:
    body = os.urandom(1 << 20)
    url = server.add("/disk.img", body, delay=0.1) + f"?checksum={sha256(body)}"
    procs = [subprocess.Popen((sys.executable, "-c", _CHILD, url, str(tmp_path / f"t{i}"),
                               str(tmp_path / "cache")), cwd=REPO)
             for i in range(2)]
    assert [p.wait(60) for p in procs] == [0, 0]
    assert server.hits["/disk.img"] == 1
    assert (tmp_path / "t1/local/disk.img").read_bytes() == body


def test_lru_eviction_spares_recent_and_pinned(server: ArtifactServer, tmp_path: Path,
                                               small_qcow2: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache", max_bytes=5 << 20)
    urls = {}
    for name in ("a", "b", "c"):
        body = name.encode() * (2 << 20)  # 2 MiB of data each (no holes)
        urls[name] = server.add(f"/{name}.img", body) + f"?checksum={sha256(body)}"
    fetch(urls["a"], tmp_path / "t1", cache=cache)
    fetch(urls["b"], tmp_path / "t2", cache=cache)
    fetch(urls["a"], tmp_path / "t3", cache=cache)  # a is now the most recently used
    fetch(urls["c"], tmp_path / "t4", cache=cache)  # over 5 MiB: b must go
    names = {json.loads(p.read_text())["source"].rsplit("/", 1)[-1]
             for p in (cache.root / "entries").glob("*/meta.json")}
    assert names == {"a.img", "c.img"}
    # A qcow2 entry read by a live overlay is pinned: it survives eviction.
    data = small_qcow2.read_bytes()
    q = server.add("/q.qcow2", data) + f"?checksum={sha256(data)}"
    small = ArtifactCache(tmp_path / "cache2", max_bytes=1)
    [overlay] = fetch(q, tmp_path / "t5", cache=small)
    fetch(urls["a"], tmp_path / "t6", cache=small)
    fetch(urls["b"], tmp_path / "t7", cache=small)
    assert image_info(overlay).backing is not None and Path(image_info(overlay).backing or "").exists()
    overlay.unlink()  # the task is gone: now it may go
    small.evict()
    assert list((small.root / "entries").glob("*")) == []


def test_weak_checksums_are_keyed_by_source_too(server: ArtifactServer, tmp_path: Path) -> None:
    body = b"same bytes"
    md5 = "md5:" + hashlib.md5(body).hexdigest()
    cache = ArtifactCache(tmp_path / "cache")
    fetch(server.add("/one.img", body) + f"?checksum={md5}", tmp_path / "t1", cache=cache)
    fetch(server.add("/two.img", body) + f"?checksum={md5}", tmp_path / "t2", cache=cache)
    assert server.hits["/one.img"] == server.hits["/two.img"] == 1


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real disk-full condition."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    try:
        subprocess.run(("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)), check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}); test_disk_full_unit covers the logic")
    yield mnt
    subprocess.run(("umount", "-l", str(mnt)), check=False)


def test_disk_full_on_a_real_tiny_filesystem(server: ArtifactServer, tmp_path: Path,
                                             tiny_fs: Path) -> None:
    body = os.urandom(3 << 20)
    url = server.add("/big.img", body) + f"?checksum={sha256(body)}"
    cache = ArtifactCache(tiny_fs / "cache")
    with pytest.raises(ArtifactError) as info:
        fetch(url, tmp_path / "task", cache=cache)
    assert str(info.value).startswith(f"artifact {url.split('?')[0]}: no space left on the "
                                      f"disk holding {tiny_fs / 'cache' / 'tmp'}")
    assert leftovers(tiny_fs / "cache") == [] and files(tmp_path / "task") == []
    task = tiny_fs / "task"  # and without a cache, straight into a full task dir
    with pytest.raises(ArtifactError, match="no space left"):
        fetch(url.split("?")[0], task)
    assert files(task) == [] and leftovers(task) == []


def test_disk_full_unit(server: ArtifactServer, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full by patching only the low-level write (for hosts that cannot mount)."""
    import errno

    from vmdriver.artifacts import transfer

    real = transfer.Sink.write

    def write(self: transfer.Sink, data: bytes | memoryview) -> None:
        if self.size > 100_000:
            raise transfer._disk_error(OSError(errno.ENOSPC, "No space left"), self.path)
        real(self, data)

    monkeypatch.setattr(transfer.Sink, "write", write)
    url = server.add("/big.img", os.urandom(1 << 20))
    with pytest.raises(ArtifactError, match="no space left on the disk holding"):
        fetch(url, tmp_path)
    assert files(tmp_path) == [] and leftovers(tmp_path) == []
