"""Fixtures for RBD pool tests: the throwaway cluster, pools on it, small real images."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ceph.cluster import Cluster, mon_command
from tests.ceph.fixtures import ceph_cluster  # noqa: F401 (the session fixture)
from tests.conftest import short_tmp
from vmdriver.storage.config import CephPoolConfig
from vmdriver.storage.rbd import RbdPool
from vmdriver.storage.rbd_ops import bindings

MIB = 1 << 20
#: A second pool, over its quota: see :func:`full_pool`.
FULL_POOL = "vmdfull"


def pool_config(cluster: Cluster, *, key: str | None = None, hosts: tuple[str, ...] = (),
                pool: str | None = None, user: str | None = None) -> CephPoolConfig:
    """The ``ceph "remote" {}`` block for the test cluster (parts overridable)."""
    return CephPoolConfig(
        name="remote", pool=pool or cluster.pool, hosts=hosts or (cluster.mon_host,),
        authentication={"username": user or cluster.client, "secret": key or cluster.client_key})


@pytest.fixture
def rbd_pool(ceph_cluster: Cluster) -> Iterator[RbdPool]:  # noqa: F811
    pool = RbdPool.from_config(pool_config(ceph_cluster))
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="session")
def admin(ceph_cluster: Cluster) -> Iterator[Any]:  # noqa: F811
    """A connected admin ``rados.Rados`` (from the cluster's own conf and keyring)."""
    client = ceph_cluster.admin()
    try:
        yield client
    finally:
        client.shutdown()


def pool_state(admin: Any, pool: str) -> dict[str, list[str]]:
    """Every image in ``pool`` with its snapshots: what 'the pool as it was' means."""
    _, rbd = bindings()

    state = {}
    with admin.open_ioctx(pool) as io:
        for name in rbd.RBD().list(io):
            with rbd.Image(io, name, read_only=True) as image:
                state[name] = sorted(s["name"] for s in image.list_snaps())
    return state


def read_image(admin: Any, pool: str, name: str, offset: int, length: int) -> bytes:
    """Bytes of an RBD image, read with the bindings."""
    _, rbd = bindings()

    with admin.open_ioctx(pool) as io, rbd.Image(io, name, read_only=True) as image:
        return bytes(image.read(offset, length))


@pytest.fixture
def work() -> Iterator[Path]:
    with short_tmp("vmd-rbdt-") as path:
        yield path


def make_image(path: Path, fmt: str, size: int, data: bytes, at: int) -> Path:
    """A real ``fmt`` image of ``size`` bytes holding ``data`` at ``at``."""
    raw = path.with_suffix(".raw") if fmt != "raw" else path
    with raw.open("wb") as f:
        f.truncate(size)
        f.seek(at)
        f.write(data)
    if fmt != "raw":
        subprocess.run(("qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(path)),
                       check=True, capture_output=True)
        raw.unlink()
    return path


@pytest.fixture(scope="module")
def full_pool(ceph_cluster: Cluster) -> Iterator[RbdPool]:  # noqa: F811
    """A second pool with its own user, over its quota (max_bytes) and flagged full."""
    admin = ceph_cluster.admin()
    user = FULL_POOL
    try:
        mon_command(admin, "osd pool create", pool=FULL_POOL, pg_num=8, pgp_num=8)
        mon_command(admin, "osd pool application enable", pool=FULL_POOL, app="rbd")
        mon_command(admin, "auth get-or-create", entity=f"client.{user}",
                    caps=["mon", "profile rbd", "osd", f"profile rbd pool={FULL_POOL}"])
        key = mon_command(admin, "auth get-key", entity=f"client.{user}")["key"]
        mon_command(admin, "osd pool set-quota", pool=FULL_POOL, field="max_bytes", val=str(MIB))
        with admin.open_ioctx(FULL_POOL) as io:
            io.write_full("filler", b"x" * (2 * MIB))
        deadline = time.monotonic() + 60
        while not _is_full(admin):
            if time.monotonic() > deadline:
                pytest.fail("the pool over its quota was not flagged full within 60 s")
            time.sleep(0.5)
        pool = RbdPool(pool_config(ceph_cluster, pool=FULL_POOL, user=user, key=key))
        yield pool
        pool.close()
    finally:
        mon_command(admin, "osd pool delete", pool=FULL_POOL, pool2=FULL_POOL,
                    yes_i_really_really_mean_it=True)
        mon_command(admin, "auth del", entity=f"client.{user}")
        admin.shutdown()


def _is_full(admin: Any) -> bool:
    pools = mon_command(admin, "osd dump")["pools"]
    return any(p["pool_name"] == FULL_POOL and "full" in p["flags_names"] for p in pools)
