"""Fixtures for the cloud-init tests: the host's cloud-init as the reference."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

CLOUD_INIT = "/usr/bin/cloud-init"
HOST_PYTHON = "/usr/bin/python3"
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def cloud_init() -> str:
    """Debian's cloud-init on the host (the schema and merge reference)."""
    if not Path(CLOUD_INIT).exists():
        pytest.skip("Debian's cloud-init is not installed on this host (apt-get install cloud-init)")
    return CLOUD_INIT


@pytest.fixture
def schema_check(cloud_init: str, tmp_path: Path) -> Callable[[str], None]:
    """Assert that a cloud-config text passes ``cloud-init schema --config-file``."""

    def check(text: str) -> None:
        path = tmp_path / "cloud-config.yaml"
        path.write_text(text)
        proc = subprocess.run((cloud_init, "schema", "--config-file", str(path)), capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 0, f"schema rejected:\n{proc.stdout}{proc.stderr}\n---\n{text}"
        assert "Valid cloud-config" in proc.stdout

    return check


@pytest.fixture
def host_python(cloud_init: str) -> str:
    """The host's Python, which can import cloud-init's own modules."""
    del cloud_init
    return HOST_PYTHON
