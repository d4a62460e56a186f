"""Shared fixtures: the test guest, short state dirs, a host config, leak checks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from vmdriver.host.config import HostConfig

REPO = Path(__file__).resolve().parent.parent
GUEST_LINK = REPO / "guest" / "out"
#: The guest's readiness line prefix (see guest/README.md).
READY = "VMDRIVER-GUEST-READY"
#: The guest serves HTTP on this port.
GUEST_HTTP_PORT = 8080


@pytest.fixture(scope="session")
def guest_dir() -> Path:
    """The built test guest; built on first use if CI did not build it already."""
    if not (GUEST_LINK / "manifest.json").exists():
        subprocess.run(("bash", str(REPO / "guest" / "build.sh")), check=True,
                       stdout=subprocess.DEVNULL)
    manifest = json.loads((GUEST_LINK / "manifest.json").read_text())
    assert manifest, "empty guest manifest"
    return GUEST_LINK.resolve()


@contextlib.contextmanager
def short_tmp(prefix: str, *, kill_qemus: bool = False) -> Iterator[Path]:
    """A private temp dir with a short path (unix socket paths must stay under 108
    bytes), removed afterwards; ``kill_qemus``: first kill QEMUs left naming it, so one
    failed test does not leave a guest running into the next."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        if kill_qemus:
            for pid in qemu_processes(str(path)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A short private state dir."""
    with short_tmp("vmd-") as path:
        yield path


@pytest.fixture
def host(state_dir: Path) -> HostConfig:
    """A permissive host config rooted in the test's state dir."""
    return HostConfig(state_dir=state_dir)


def qemu_processes(mentioning: str = "") -> set[int]:
    """Pids of running QEMU system emulators, optionally only those whose argv names a path."""
    out = set()
    for p in psutil.process_iter(["name", "cmdline", "status"]):
        name = p.info.get("name") or ""
        if not name.startswith("qemu-system") or p.info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        if mentioning and not any(mentioning in arg for arg in p.info.get("cmdline") or ()):
            continue
        out.add(p.pid)
    return out


@pytest.fixture
def no_leaks(state_dir: Path) -> Iterator[None]:
    """Fail the test if it leaves a QEMU process or a socket behind."""
    # Only QEMUs of this test: other test runs may share the machine.
    yield
    leaked = qemu_processes(str(state_dir))
    for pid in leaked:
        with __import__("contextlib").suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()  # don't let one failure cascade
    assert not leaked, f"QEMU processes left behind: {sorted(leaked)}"
    sockets = [p for p in state_dir.rglob("*.sock")]
    assert not sockets, f"sockets left behind: {sockets}"


def pytest_report_header() -> str:
    cache = os.environ.get("VMDRIVER_GUEST_CACHE", "/var/cache/vmdriver/guest")
    return f"vmdriver tests; guest cache {cache}"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regen-golden", action="store_true",
                     help="rewrite tests/golden/*.argv from the current renderer")


#: Test dirs that must not run beside each other on separate workers: macvtap device
#: nodes (/dev/tapN, numbered by ifindex) clash across network namespaces, and the
#: Ceph tests share one throwaway cluster.
_SERIAL_GROUPS = {"network": "net", "netvm": "net", "ceph": "ceph", "storage_rbd": "ceph"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``-n N --dist loadgroup``: one worker per file (its booted fixtures are
    module-scoped), one worker for each serial group above.

    xdist groups by an ``@group`` suffix of the node id, which its own hook derives
    from ``xdist_group`` marks by assigning ``item._nodeid``; pytest 9 keeps the id in
    ``item._id``, so that never takes effect. The suffix is written here instead.
    """
    if not getattr(config.option, "loadgroup", False):  # set in xdist's workers
        return
    for item in items:
        if "@" in item.nodeid.rsplit("]", 1)[-1]:
            continue  # already grouped
        path = item.nodeid.split("::", 1)[0]
        parts = path.split("/")
        group = _SERIAL_GROUPS.get(parts[1], path) if len(parts) > 2 else path
        item._id = f"{item.nodeid}@{group}"  # type: ignore[assignment]
