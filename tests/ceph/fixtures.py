"""The throwaway Ceph cluster as a session-scoped pytest fixture.

Use it from a conftest: ``from tests.ceph.fixtures import ceph_cluster  # noqa: F401``.
The cluster starts once per test session (~8 s), lives in a private temp dir, and is
torn down (daemons killed, dir removed) at the end of the session, also when tests
fail. Where it cannot start, every test using it is skipped with one line naming why.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ceph.cluster import Cluster, ClusterError, down, up


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[Cluster]:
    """A running single-node cluster with pool ``vmd`` and user ``client.vmd`` limited to it."""
    d = Path(tempfile.mkdtemp(prefix="vmd-ceph-", dir="/tmp"))
    try:
        cluster = up(d, tied=True)  # its daemons are stopped by up() itself if it fails
    except ClusterError as exc:
        shutil.rmtree(d, ignore_errors=True)
        pytest.skip(f"ceph cluster did not start: {exc}")
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)  # a bug or an interrupt: fail, leave no dir
        raise
    try:
        yield cluster
    finally:
        down(d)
