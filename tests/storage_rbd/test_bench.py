"""bench.rbd's measuring function runs on the session cluster and returns sane numbers."""

from __future__ import annotations

from pathlib import Path

from bench.rbd import measure
from tests.ceph.cluster import Cluster
from tests.storage_rbd.conftest import pool_state


def test_chained_creation_numbers(ceph_cluster: Cluster, admin: object, work: Path) -> None:
    before = pool_state(admin, ceph_cluster.pool)
    out = measure(ceph_cluster, work, boot=False)
    for key in ("rbd_chained_first_s", "rbd_chained_s", "dir_chained_s", "qemu_img_overlay_s"):
        assert 0 < out[key] < 60, (key, out)
    # A clone of an existing base costs a few RBD round trips, not a copy of the image.
    assert out["rbd_chained_s"] < out["rbd_chained_first_s"]
    assert out["chained_ratio_rbd_vs_dir"] > 0
    assert pool_state(admin, ceph_cluster.pool) == before
