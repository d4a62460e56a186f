"""A VM's cgroup limits as the kernel holds them, under whatever hierarchy this host has.

vmdriver writes v1 files where the controllers are mounted as v1 (this
includes hybrid hosts, where only a controller-less v2 tree sits at
``unified/``) and v2 files under the unified hierarchy. These helpers follow
the process's own ``/proc/<pid>/cgroup`` to the directory it is really in and
read the real file there, so a test asserts what confines QEMU, not what
vmdriver meant to write.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmdriver.runtime import cgroup


def _mode() -> cgroup.CgroupMode:
    if os.geteuid() != 0:
        pytest.skip("cgroup confinement is applied only as root")
    mode = cgroup.detect_mode()
    if mode is cgroup.CgroupMode.NONE:
        pytest.skip(f"no cgroup hierarchy mounted at {cgroup.ROOT}")
    return mode


def controller_dir(pid: int, controller: str) -> Path:
    """The cgroup dir holding ``pid`` for ``controller`` (v1) or in the unified tree (v2)."""
    groups = cgroup.cgroups_of(pid)
    if _mode() is cgroup.CgroupMode.V1:
        return cgroup.ROOT / controller / groups[controller].lstrip("/")
    return cgroup.ROOT / groups[""].lstrip("/")


def memory_limit(pid: int) -> tuple[Path, int]:
    """(cgroup dir, hard memory limit in bytes) of ``pid``."""
    d = controller_dir(pid, "memory")
    name = "memory.limit_in_bytes" if _mode() is cgroup.CgroupMode.V1 else "memory.max"
    return d, int((d / name).read_text())


def cpu_weight(pid: int, shares: int) -> tuple[Path, str, str]:
    """(cgroup dir, the CPU weight file's content, what ``shares`` should have become there)."""
    d = controller_dir(pid, "cpu")
    if _mode() is cgroup.CgroupMode.V1:
        return d, (d / "cpu.shares").read_text().strip(), str(shares)
    return d, (d / "cpu.weight").read_text().strip(), str(cgroup.shares_to_weight(shares))
