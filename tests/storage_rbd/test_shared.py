"""Bases under concurrency and after crashes; the pool reached through the storage_pools block."""

from __future__ import annotations

import secrets
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.ceph.cluster import Cluster
from tests.storage_rbd.conftest import MIB, make_image, pool_config, pool_state
from vmdriver.storage import Pools, parse_disks, parse_storage_pools, rbd_ops
from vmdriver.storage.base import SourceImage, Volume
from vmdriver.storage.disks import DiskRequest, DiskSource
from vmdriver.storage.rbd import RbdPool


def test_two_tasks_chaining_a_new_image_at_once_make_one_base(
        ceph_cluster: Cluster, admin: Any, work: Path) -> None:
    src = make_image(work / "new.raw", "raw", 8 * MIB, secrets.token_bytes(4096), MIB)
    before = pool_state(admin, ceph_cluster.pool)
    allocs = [secrets.token_hex(4) for _ in range(2)]
    start = threading.Barrier(2)
    made: dict[str, Volume] = {}
    errors: list[BaseException] = []

    def chain(alloc: str) -> None:
        # Separate connections, as two plugin processes would have.
        with RbdPool(pool_config(ceph_cluster)) as pool, \
                SourceImage.open(src, fmt="raw", where="disk[0].source.image") as img:
            req = pool.volume_request(
                DiskRequest(chained=True, source=DiskSource(image="x")), alloc_id=alloc,
                task="t", index=0, image=img)
            pool.has_volume("x")  # connected before the race starts
            start.wait()
            try:
                made[alloc] = pool.create_volume(req)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=chain, args=(a,)) for a in allocs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    new = set(pool_state(admin, ceph_cluster.pool)) - set(before)
    bases = [n for n in new if rbd_ops.is_base(n)]
    assert len(bases) == 1 and not [n for n in new if ".tmp-" in n], new
    assert {v.backing for v in made.values()} == {bases[0]}
    with RbdPool(pool_config(ceph_cluster)) as pool:
        for a in allocs:
            pool.remove_task_volumes(a, "t")
    assert pool_state(admin, ceph_cluster.pool) == before


def test_a_base_whose_builder_died_is_collected_but_not_one_being_built(
        rbd_pool: RbdPool, admin: Any, ceph_cluster: Cluster,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, rbd = rbd_ops.bindings()
    before = pool_state(admin, ceph_cluster.pool)
    dead = rbd_ops.BASE_PREFIX + secrets.token_hex(32)
    building = rbd_ops.BASE_PREFIX + secrets.token_hex(32)
    monkeypatch.setattr(rbd_ops, "BUILD_GRACE_S", -1)  # no grace: only watchers count
    with admin.open_ioctx(ceph_cluster.pool) as io:
        for name in (dead, building):
            rbd.RBD().create(io, name, MIB)  # no protected snapshot: not complete
        with rbd.Image(io, building):  # its builder still has it open
            removed = rbd_pool.collect_bases()
        assert dead in removed and building not in removed
        rbd.RBD().remove(io, building)
    assert pool_state(admin, ceph_cluster.pool) == before


def test_ceph_block_of_storage_pools_opens_an_rbd_pool(ceph_cluster: Cluster, admin: Any,
                                                       work: Path) -> None:
    raw = {"default": "local",
           "directory": [{"local": {"path": str(work / "pool")}}],
           "ceph": [{"remote": {"pool": ceph_cluster.pool, "hosts": [ceph_cluster.mon_host],
                                "authentication": [{"username": ceph_cluster.client,
                                                    "secret": ceph_cluster.client_key}]}}]}
    disks = parse_disks([{"size": "16MiB", "pool": "remote", "primary": True},
                         {"size": "8MiB"}])
    alloc = secrets.token_hex(4)
    before = pool_state(admin, ceph_cluster.pool)
    with Pools(parse_storage_pools(raw, "host.hcl")) as pools:
        pools.check(disks)
        vols = pools.create_task_volumes(alloc, "web", disks)
        assert isinstance(pools.get("remote"), RbdPool)
        assert vols[0] is not None and vols[0].protocol["driver"] == "rbd"
        assert vols[1] is not None and vols[1].path is not None  # the directory pool's
        assert set(pool_state(admin, ceph_cluster.pool)) - set(before) == {f"{alloc}-web-0"}
        pools.remove_task_volumes(alloc, "web")
    assert pool_state(admin, ceph_cluster.pool) == before
