"""Fixtures for artifact tests: a live HTTP server and small real disk images."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.artifacts.artifact_server import ArtifactServer


@pytest.fixture
def server() -> Iterator[ArtifactServer]:
    srv = ArtifactServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def small_qcow2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4 MiB qcow2 image with a recognisable first sector."""
    d = tmp_path_factory.mktemp("img")
    raw = d / "seed.raw"
    with open(raw, "wb") as f:
        f.write(b"VMDRIVER-ARTIFACT-TEST".ljust(512, b"\0"))
        f.truncate(4 << 20)
    out = d / "small.qcow2"
    subprocess.run(("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out)),
                   check=True)
    return out
