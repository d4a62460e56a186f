"""Every disk semantic on a real Ceph pool, checked with the rados/rbd bindings."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from tests.ceph.cluster import Cluster
from tests.storage_rbd.conftest import MIB, make_image, pool_state, read_image
from vmdriver.errors import SpecError
from vmdriver.storage.base import SourceImage, Volume
from vmdriver.storage.disks import DiskRequest, DiskSource
from vmdriver.storage.errors import StorageError
from vmdriver.storage.rbd import RbdPool
from vmdriver.storage.rbd_ops import BASE_SNAP, bindings, is_base

PATTERN = b"vmdriver-rbd-" * 1000


def alloc() -> str:
    return secrets.token_hex(4)


def create(pool: RbdPool, alloc_id: str, index: int, disk: DiskRequest,
           image: SourceImage | None = None) -> Volume:
    req = pool.volume_request(disk, alloc_id=alloc_id, task="web", index=index, image=image)
    return pool.create_volume(req)


def parent(admin: Any, pool: str, name: str) -> tuple[str, str, str] | None:
    _, rbd = bindings()

    with admin.open_ioctx(pool) as io, rbd.Image(io, name, read_only=True) as image:
        try:
            return tuple(image.parent_info())
        except rbd.ImageNotFound:
            return None


@pytest.fixture
def qcow2(work: Path) -> Path:
    return make_image(work / "src.qcow2", "qcow2", 32 * MIB, PATTERN, 5 * MIB)


def test_empty_volume_has_its_size_and_is_named_after_alloc_and_task(
        rbd_pool: RbdPool, admin: Any, ceph_cluster: Cluster) -> None:
    a = alloc()
    before = pool_state(admin, ceph_cluster.pool)
    vol = create(rbd_pool, a, 0, DiskRequest(size=64 * MIB))
    assert vol.name == f"{a}-web-0"
    assert (vol.size, vol.format, vol.path, vol.backing) == (64 * MIB, "raw", None, None)
    assert read_image(admin, ceph_cluster.pool, vol.name, 0, 4096) == bytes(4096)
    assert [v.name for v in rbd_pool.task_volumes(a, "web")] == [vol.name]
    assert rbd_pool.remove_task_volumes(a, "web") == [vol.name]
    assert pool_state(admin, ceph_cluster.pool) == before


def test_image_is_imported_then_grown_never_shrunk(
        rbd_pool: RbdPool, admin: Any, ceph_cluster: Cluster, qcow2: Path) -> None:
    a = alloc()
    with SourceImage.open(qcow2, where="disk[0].source.image") as img:
        vol = create(rbd_pool, a, 0, DiskRequest(size=48 * MIB, source=DiskSource(image="x")), img)
        assert vol.size == 48 * MIB
        # The qcow2 was converted: the guest-visible bytes are in the raw RBD image.
        assert read_image(admin, ceph_cluster.pool, vol.name, 5 * MIB, len(PATTERN)) == PATTERN
        with pytest.raises(SpecError, match="smaller than the source") as err:
            create(rbd_pool, a, 1, DiskRequest(size=16 * MIB, source=DiskSource(image="x")), img)
        assert err.value.where == "disk[1].size"
    assert not rbd_pool.has_volume(f"{a}-web-1")
    rbd_pool.remove_task_volumes(a, "web")


def test_clone_of_a_volume_shares_its_data_and_is_cleaned_up(
        rbd_pool: RbdPool, admin: Any, ceph_cluster: Cluster, qcow2: Path) -> None:
    a, b = alloc(), alloc()
    with SourceImage.open(qcow2, where="disk[0].source.image") as img:
        src = create(rbd_pool, a, 0, DiskRequest(source=DiskSource(image="x")), img)
    before = pool_state(admin, ceph_cluster.pool)
    clone = create(rbd_pool, b, 0, DiskRequest(size=40 * MIB, source=DiskSource(volume=src.name)))
    # An RBD clone of a protected snapshot named after the clone, grown to its size.
    assert parent(admin, ceph_cluster.pool, clone.name) == (ceph_cluster.pool, src.name, clone.name)
    assert clone.backing == src.name and clone.size == 40 * MIB
    assert read_image(admin, ceph_cluster.pool, clone.name, 5 * MIB, len(PATTERN)) == PATTERN
    assert rbd_pool.remove_task_volumes(b, "web") == [clone.name]
    assert pool_state(admin, ceph_cluster.pool) == before  # the snapshot went too
    rbd_pool.remove_task_volumes(a, "web")


def test_flattened_clone_does_not_depend_on_its_source(
        ceph_cluster: Cluster, admin: Any, qcow2: Path) -> None:
    from tests.storage_rbd.conftest import pool_config

    a, b = alloc(), alloc()
    with RbdPool(pool_config(ceph_cluster), flatten_clones=True) as flat:
        assert isinstance(flat, RbdPool)
        with SourceImage.open(qcow2, where="disk[0].source.image") as img:
            src = create(flat, a, 0, DiskRequest(source=DiskSource(image="x")), img)
        copy = create(flat, b, 0, DiskRequest(source=DiskSource(volume=src.name)))
        assert parent(admin, ceph_cluster.pool, copy.name) is None
        assert pool_state(admin, ceph_cluster.pool)[src.name] == []  # snapshot dropped
        # The source can go first: the copy is a volume of its own.
        flat.remove_task_volumes(a, "web")
        assert read_image(admin, ceph_cluster.pool, copy.name, 5 * MIB, len(PATTERN)) == PATTERN
        flat.remove_task_volumes(b, "web")


def test_chained_disks_share_one_base_removed_with_its_last_clone(
        rbd_pool: RbdPool, admin: Any, ceph_cluster: Cluster, qcow2: Path) -> None:
    a, b = alloc(), alloc()
    before = pool_state(admin, ceph_cluster.pool)
    disk = DiskRequest(size=64 * MIB, chained=True, source=DiskSource(image="x"))
    with SourceImage.open(qcow2, where="disk[0].source.image") as img:
        one = create(rbd_pool, a, 0, disk, img)
        two = create(rbd_pool, b, 0, disk, img)
    bases = [n for n in pool_state(admin, ceph_cluster.pool) if is_base(n)]
    assert len(bases) == 1, bases
    base = bases[0]
    for vol in (one, two):
        assert parent(admin, ceph_cluster.pool, vol.name) == (ceph_cluster.pool, base, BASE_SNAP)
        assert vol.backing == base and vol.size == 64 * MIB
        assert read_image(admin, ceph_cluster.pool, vol.name, 5 * MIB, len(PATTERN)) == PATTERN
    assert pool_state(admin, ceph_cluster.pool)[base] == [BASE_SNAP]
    rbd_pool.remove_task_volumes(a, "web")
    assert base in pool_state(admin, ceph_cluster.pool)  # still used by the second
    rbd_pool.remove_task_volumes(b, "web")
    assert pool_state(admin, ceph_cluster.pool) == before


def test_chained_on_a_volume_and_removal_order_within_a_task(
        rbd_pool: RbdPool, admin: Any, ceph_cluster: Cluster) -> None:
    a = alloc()
    before = pool_state(admin, ceph_cluster.pool)
    src = create(rbd_pool, a, 0, DiskRequest(size=8 * MIB))
    chained = create(rbd_pool, a, 1, DiskRequest(chained=True, source=DiskSource(volume=src.name)))
    assert parent(admin, ceph_cluster.pool, chained.name)[1] == src.name  # type: ignore[index]
    # The source has a clone: it cannot go alone, but the task's destroy orders them.
    assert sorted(rbd_pool.remove_task_volumes(a, "web")) == [src.name, chained.name]
    assert pool_state(admin, ceph_cluster.pool) == before


def test_read_only_and_reuse(rbd_pool: RbdPool, ceph_cluster: Cluster) -> None:
    a = alloc()
    req = rbd_pool.volume_request(DiskRequest(size=MIB, read_only=True), alloc_id=a, task="web",
                                  index=0)
    vol = rbd_pool.create_volume(req)
    assert vol.read_only and not vol.reused
    again = rbd_pool.create_volume(req, exist_ok=True)
    assert again.reused and again.name == vol.name
    with pytest.raises(StorageError, match="already exists"):
        rbd_pool.create_volume(req)
    rbd_pool.remove_task_volumes(a, "web")


def test_blockdev_options_name_pool_image_monitors_and_user_not_the_key(
        rbd_pool: RbdPool, ceph_cluster: Cluster, work: Path) -> None:
    host, port = ceph_cluster.mon_host.rsplit(":", 1)
    opts = rbd_pool.protocol("img")
    assert opts == {"driver": "rbd", "pool": ceph_cluster.pool, "image": "img",
                    "server": [{"host": host, "port": port}], "user": ceph_cluster.client,
                    "auth-client-required": ["cephx"], "conf": "/dev/null"}
    assert rbd_pool.protocol("img", "sec0") == {**opts, "key-secret": "sec0"}
    medium = rbd_pool.medium("img")
    assert (medium.pool, medium.image, medium.monitors, medium.user, medium.secret_ref) == (
        ceph_cluster.pool, "img", (ceph_cluster.mon_host,), ceph_cluster.client, "remote")
    secret = rbd_pool.write_secret_file(work / "key")
    assert secret.read_text() == ceph_cluster.client_key
    assert secret.stat().st_mode & 0o777 == 0o600
    assert ceph_cluster.client_key not in repr(rbd_pool) + repr(rbd_pool.config)


def test_ceph_pool_refuses_what_rbd_cannot_store(rbd_pool: RbdPool) -> None:
    with pytest.raises(SpecError, match="sparse cannot be disabled"):
        rbd_pool.volume_request(DiskRequest(size=MIB, sparse=False), alloc_id=alloc(), task="t",
                                index=0)
    with pytest.raises(SpecError, match="stores only raw"):
        rbd_pool.volume_request(DiskRequest(size=MIB, format="qcow2"), alloc_id=alloc(), task="t",
                                index=0)
    req = rbd_pool.volume_request(DiskRequest(size=MIB), alloc_id=alloc(), task="t", index=0)
    assert (req.format, req.sparse) == ("raw", True)


def test_collect_bases_removes_what_a_crash_left(
        rbd_pool: RbdPool, admin: Any, ceph_cluster: Cluster, qcow2: Path) -> None:
    _, rbd = bindings()

    a = alloc()
    before = pool_state(admin, ceph_cluster.pool)
    with SourceImage.open(qcow2, where="disk[0].source.image") as img:
        vol = create(rbd_pool, a, 0, DiskRequest(chained=True, source=DiskSource(image="x")), img)
    src = create(rbd_pool, a, 1, DiskRequest(size=MIB))
    orphan = f"{alloc()}-gone-0"
    with admin.open_ioctx(ceph_cluster.pool) as io:
        # A crash after the clone's snapshot, before the clone; and after a clone's removal.
        with rbd.Image(io, src.name) as image:
            image.create_snap(orphan)
            image.protect_snap(orphan)
        rbd.RBD().remove(io, vol.name)
    removed = rbd_pool.collect_bases()
    assert f"{src.name}@{orphan}" in removed and any(is_base(n) for n in removed)
    rbd_pool.remove_task_volumes(a, "web")
    assert pool_state(admin, ceph_cluster.pool) == before
