"""Failure behaviour on a real cluster: unreachable monitors, a wrong key, a full pool, no leaks."""

from __future__ import annotations

import logging
import secrets
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.ceph.cluster import Cluster, free_port, gen_key
from tests.storage_rbd.conftest import FULL_POOL, MIB, make_image, pool_config, pool_state
from vmdriver.storage.base import SourceImage
from vmdriver.storage.disks import DiskRequest, DiskSource
from vmdriver.storage.errors import StorageError, StorageFull
from vmdriver.storage.rbd import RbdPool


def _create(pool: RbdPool, disk: DiskRequest, image: SourceImage | None = None) -> None:
    req = pool.volume_request(disk, alloc_id=secrets.token_hex(4), task="t", index=0, image=image)
    pool.create_volume(req)


def test_unreachable_monitors_fail_fast_naming_them(ceph_cluster: Cluster) -> None:
    port = free_port()  # nothing listens there
    pool = RbdPool(pool_config(ceph_cluster, hosts=(f"127.0.0.1:{port}",)))
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        pool.has_volume("x")
    assert time.monotonic() - start < 30
    assert f"127.0.0.1:{port}" in str(err.value) and "no Ceph monitor reachable" in str(err.value)


def test_silent_monitor_fails_within_the_timeout(ceph_cluster: Cluster) -> None:
    # Accepts TCP but never speaks Ceph: librados alone would wait 300 s.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        pool = RbdPool(pool_config(ceph_cluster, hosts=(f"127.0.0.1:{port}",)), timeout=3)
        start = time.monotonic()
        with pytest.raises(StorageError, match=f"127.0.0.1:{port}"):
            pool.has_volume("x")
    assert time.monotonic() - start < 30


def test_wrong_key_names_the_user_not_the_key(ceph_cluster: Cluster,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = gen_key()
    pool = RbdPool(pool_config(ceph_cluster, key=wrong), timeout=4)
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        pool.has_volume("x")
    assert time.monotonic() - start < 30
    text = f"{err.value} {err.value!r} {pool!r}"
    assert f"client.{ceph_cluster.client}" in text
    assert wrong not in text and wrong not in caplog.text
    assert ceph_cluster.client_key not in text


def test_unknown_pool_is_named(ceph_cluster: Cluster) -> None:
    pool = RbdPool(pool_config(ceph_cluster, pool="no-such-pool"))
    with pytest.raises(StorageError, match="no such pool") as err:
        pool.has_volume("x")
    assert "'no-such-pool'" in str(err.value)


@pytest.fixture
def recorded_argv(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every argv this process starts (the real calls still happen)."""
    seen: list[str] = []
    real_init = subprocess.Popen.__init__

    def spy(self: subprocess.Popen[Any], args: Any, *a: Any, **kw: Any) -> None:
        seen.append(" ".join(map(str, args)) if not isinstance(args, str) else args)
        real_init(self, args, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", spy)
    return seen


def test_secret_never_in_argv_logs_or_errors(rbd_pool: RbdPool, ceph_cluster: Cluster, work: Path,
                                             recorded_argv: list[str],
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = ceph_cluster.client_key
    src = make_image(work / "s.qcow2", "qcow2", 8 * MIB, b"data", 0)
    a = secrets.token_hex(4)
    with SourceImage.open(src, where="disk[0].source.image") as img:
        for i, chained in enumerate((False, True)):
            req = rbd_pool.volume_request(
                DiskRequest(chained=chained, source=DiskSource(image="x")), alloc_id=a, task="t",
                index=i, image=img)
            rbd_pool.create_volume(req)
        with pytest.raises(StorageError) as err:
            rbd_pool.create_volume(req)  # exists
    rbd_pool.remove_task_volumes(a, "t")
    assert any("qemu-img" in argv and "--object" in argv for argv in recorded_argv)
    assert not [argv for argv in recorded_argv if key in argv]
    assert key not in caplog.text and key not in str(err.value)


@pytest.mark.parametrize("kind", ["empty", "image", "chained"])
def test_full_pool_fails_the_create_and_leaves_it_as_it_was(
        full_pool: RbdPool, ceph_cluster: Cluster, work: Path, kind: str) -> None:
    admin = ceph_cluster.admin()
    try:
        before = pool_state(admin, FULL_POOL)
        src = make_image(work / "s.raw", "raw", 4 * MIB, b"data", 0)
        start = time.monotonic()
        with SourceImage.open(src, fmt="raw", where="disk[0].source.image") as img:
            disk = {"empty": DiskRequest(size=4 * MIB),
                    "image": DiskRequest(source=DiskSource(image="x")),
                    "chained": DiskRequest(chained=True, source=DiskSource(image="x"))}[kind]
            with pytest.raises(StorageFull, match="full"):
                _create(full_pool, disk, img if kind != "empty" else None)
        assert time.monotonic() - start < 30
        assert pool_state(admin, FULL_POOL) == before
    finally:
        admin.shutdown()


def test_keyring_free_whatever_the_environment_says(ceph_cluster: Cluster, work: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # librados parses CEPH_ARGS and friends when a client is created; the pool's own
    # values (monitors, key, no keyring) must win, in the bindings and in qemu-img.
    bogus = work / "bogus"
    bogus.write_text("[global]\nmon_host = 127.0.0.1:1\n")
    monkeypatch.setenv("CEPH_CONF", str(bogus))
    monkeypatch.setenv("CEPH_KEYRING", str(bogus))
    monkeypatch.setenv("CEPH_ARGS", f"--mon-host 127.0.0.1:1 --keyring {bogus} --id nobody")
    src = make_image(work / "s.raw", "raw", 2 * MIB, b"data", 0)
    alloc = secrets.token_hex(4)
    with RbdPool(pool_config(ceph_cluster), timeout=5) as pool, \
            SourceImage.open(src, fmt="raw", where="disk[0].source.image") as img:
        req = pool.volume_request(DiskRequest(source=DiskSource(image="x")), alloc_id=alloc,
                                  task="t", index=0, image=img)
        assert pool.create_volume(req).size == 2 * MIB  # qemu-img wrote it through cephx
        assert pool.remove_task_volumes(alloc, "t") == [f"{alloc}-t-0"]
