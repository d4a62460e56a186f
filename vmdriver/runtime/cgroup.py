"""Confining a QEMU process with cgroups: memory limit, CPU weight, cpuset.

The limits follow Nomad's own drivers: one cgroup per task, named
``<alloc id>.<task>`` (v1: under ``/sys/fs/cgroup/<controller>/<parent>/``;
v2: Nomad's ``cpuset_cgroup`` scope, or ``/sys/fs/cgroup/<parent>/<scope>``).

Unlike Nomad's qemu driver, the memory limit is *not* the guest's RAM: QEMU
needs memory of its own beyond what it gives the guest (device emulation, page
tables, vCPU stacks, under TCG the translation cache), and a cgroup limit equal
to the guest RAM gets QEMU OOM-killed once the guest touches all of it (Nomad
issue #27392). :func:`memory_limit_mib` adds :func:`memory_headroom_mib` on top.

Confining is best effort: where a cgroup file cannot be written (no root, a
read-only cgroupfs, a controller that is not mounted) the VM still runs and
the caller gets the reasons back as warnings.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from vmdriver.spec import Resources

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
MIB = 1024 * 1024
#: QEMU's own fixed needs: its binary and libraries, device models, I/O buffers.
HEADROOM_BASE_MIB = 192
#: Per vCPU: thread stack and per-vCPU state.
HEADROOM_PER_VCPU_MIB = 4
#: Share of guest RAM for page tables, dirty bitmaps and virtqueue buffers.
HEADROOM_RAM_DIVISOR = 8
#: Under TCG, the translated-code cache (QEMU reserves up to 1 GiB, fills it lazily).
HEADROOM_TCG_MIB = 256


class CgroupMode(enum.StrEnum):
    """Which cgroup hierarchy this host uses."""

    V1 = "v1"
    V2 = "v2"
    NONE = "none"


def detect_mode(root: Path = ROOT) -> CgroupMode:
    """v2 when the unified hierarchy is mounted at ``root``, v1 when controllers are, else none."""
    if (root / "cgroup.controllers").exists():
        return CgroupMode.V2
    if (root / "memory").is_dir() or (root / "cpu").is_dir():
        return CgroupMode.V1
    return CgroupMode.NONE


def memory_headroom_mib(guest_mib: int, vcpus: int = 1, accelerator: str = "tcg") -> int:
    """What QEMU needs beyond the guest's RAM, in MiB.

    ``192 + guest/8 + 4 * vCPUs``, plus 256 under TCG. For a 300 MiB TCG guest
    with one vCPU: 192 + 37 + 4 + 256 = 489 MiB.
    """
    headroom = HEADROOM_BASE_MIB + guest_mib // HEADROOM_RAM_DIVISOR
    headroom += HEADROOM_PER_VCPU_MIB * max(1, vcpus)
    if accelerator != "kvm":
        headroom += HEADROOM_TCG_MIB
    return headroom


def memory_limit_mib(guest_mib: int, vcpus: int = 1, accelerator: str = "tcg",
                     task_limit_mib: int | None = None) -> int:
    """The hard limit for the QEMU process: guest RAM plus headroom, or the task's own if higher.

    ``task_limit_mib`` is the scheduler's limit (Nomad: ``max(memory, memory_max)``).
    """
    need = guest_mib + memory_headroom_mib(guest_mib, vcpus, accelerator)
    return max(need, task_limit_mib or 0)


def limits_for(resources: Resources, accelerator: str, *, task_limit_mib: int | None = None,
               cpu_shares: int | None = None, cpuset_cpus: str = "") -> CgroupLimits:
    """The limits a VM with ``resources`` gets: memory with headroom, CPU weight, cpuset."""
    mem = memory_limit_mib(resources.memory_mib, resources.cores or 1, accelerator,
                           task_limit_mib if task_limit_mib is not None
                           else resources.memory_max_mib)
    shares = cpu_shares if cpu_shares is not None else resources.cpu_shares
    return CgroupLimits(memory_max_bytes=mem * MIB, cpu_shares=shares, cpuset_cpus=cpuset_cpus)


def shares_to_weight(shares: int) -> int:
    """cgroup v1 ``cpu.shares`` (2..262144) to v2 ``cpu.weight`` (1..10000), as runc does."""
    shares = min(max(shares, 2), 262144)
    return 1 + ((shares - 2) * 9999) // 262142


@dataclass(frozen=True)
class CgroupLimits:
    """What to confine a process to; ``None``/empty leaves that controller alone."""

    memory_max_bytes: int | None = None
    cpu_shares: int | None = None
    #: Host CPUs, in cgroup list syntax (``0-1,4``).
    cpuset_cpus: str = ""


@dataclass(frozen=True)
class Placement:
    """Where a process was put, and what could not be done."""

    mode: CgroupMode
    #: cgroup directories holding the process.
    paths: tuple[str, ...] = ()
    #: Directories this module created (and removes again with :func:`remove`).
    created: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=())


class _Writer:
    """Collects created dirs and warnings while applying limits."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self.warnings: list[str] = []

    def mkdir(self, path: Path) -> bool:
        # Only the task's own cgroup is ours to remove later; parents are shared.
        new = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.warnings.append(f"cannot create cgroup {path}: {exc.strerror or exc}")
            return False
        if new:
            self.created.append(str(path))
        return True

    def write(self, path: Path, value: str, *, quiet: bool = False) -> bool:
        try:
            path.write_text(value)
        except OSError as exc:
            if not quiet:
                self.warnings.append(f"cannot write {value!r} to {path}: {exc.strerror or exc}")
            return False
        return True


def apply(pid: int, limits: CgroupLimits, scope: str, *, parent: str = "vmdriver",
          cpuset_cgroup: str = "", root: Path = ROOT) -> Placement:
    """Put ``pid`` (with all its threads) into its own cgroup(s) and set ``limits``.

    ``scope`` names the task's cgroup (no ``/``); ``cpuset_cgroup`` is a cgroup
    the scheduler already made for the task (Nomad's ``LinuxResources.cpuset_cgroup``).
    Never raises: failures come back in :attr:`Placement.warnings`.
    """
    scope = scope.replace("/", "_")
    mode = detect_mode(root)
    w = _Writer()
    if mode is CgroupMode.V1:
        paths = _apply_v1(w, pid, limits, scope, parent, cpuset_cgroup, root)
    elif mode is CgroupMode.V2:
        paths = _apply_v2(w, pid, limits, scope, parent, cpuset_cgroup, root)
    else:
        paths = []
        w.warnings.append(f"no cgroup hierarchy mounted at {root}")
    placement = Placement(mode, tuple(paths), tuple(w.created), tuple(w.warnings))
    for warning in placement.warnings:
        log.warning("pid %d runs without some cgroup limits: %s", pid, warning)
    return placement


def _apply_v1(w: _Writer, pid: int, limits: CgroupLimits, scope: str, parent: str,
              cpuset_cgroup: str, root: Path) -> list[str]:
    paths: list[str] = []
    if limits.memory_max_bytes is not None:
        d = root / "memory" / parent / scope
        # Charges made before the move (QEMU's start-up) follow it where the kernel allows.
        if w.mkdir(d) and w.write(d / "memory.limit_in_bytes", str(limits.memory_max_bytes)):
            w.write(d / "memory.move_charge_at_immigrate", "3", quiet=True)
            if w.write(d / "cgroup.procs", str(pid)):
                paths.append(str(d))
    if limits.cpu_shares is not None:
        d = root / "cpu" / parent / scope
        shares = str(max(2, limits.cpu_shares))
        if w.mkdir(d) and w.write(d / "cpu.shares", shares) and w.write(d / "cgroup.procs", str(pid)):
            paths.append(str(d))
    if cpuset_cgroup and Path(cpuset_cgroup).is_dir():
        # Nomad made and sized this cpuset cgroup; joining it is all there is to do.
        if w.write(Path(cpuset_cgroup) / "cgroup.procs", str(pid)):
            paths.append(cpuset_cgroup)
    elif limits.cpuset_cpus:
        paths += _cpuset_v1(w, pid, limits.cpuset_cpus, root / "cpuset", root / "cpuset" / parent / scope)
    return paths


def _cpuset_v1(w: _Writer, pid: int, cpus_wanted: str, base: Path, d: Path) -> list[str]:
    if not w.mkdir(d):
        return []
    # A new v1 cpuset is empty and takes no tasks until cpus and mems are set,
    # each level from the root down.
    mems = _read(base / "cpuset.mems")
    cpus = _read(base / "cpuset.cpus")
    for level in (d.parent, d):
        if not _read(level / "cpuset.mems"):
            w.write(level / "cpuset.mems", mems)
        if level != d and not _read(level / "cpuset.cpus"):
            w.write(level / "cpuset.cpus", cpus)
    if w.write(d / "cpuset.cpus", cpus_wanted) and w.write(d / "cgroup.procs", str(pid)):
        return [str(d)]
    return []


def _apply_v2(w: _Writer, pid: int, limits: CgroupLimits, scope: str, parent: str,
              cpuset_cgroup: str, root: Path) -> list[str]:
    d = Path(cpuset_cgroup) if cpuset_cgroup else root / parent / scope
    if not w.mkdir(d):
        return []
    wanted = []
    if limits.memory_max_bytes is not None:
        wanted.append("memory")
    if limits.cpu_shares is not None:
        wanted.append("cpu")
    if limits.cpuset_cpus:
        wanted.append("cpuset")
    # Controllers must be enabled on every ancestor for the files to appear in d.
    for level in reversed(d.relative_to(root).parents):
        available = set(_read(root / level / "cgroup.controllers").split())
        enable = " ".join(f"+{c}" for c in wanted if c in available)
        if enable:
            w.write(root / level / "cgroup.subtree_control", enable)
    if limits.memory_max_bytes is not None:
        w.write(d / "memory.max", str(limits.memory_max_bytes))
    if limits.cpu_shares is not None:
        w.write(d / "cpu.weight", str(shares_to_weight(limits.cpu_shares)))
    if limits.cpuset_cpus:
        w.write(d / "cpuset.cpus", limits.cpuset_cpus)
    return [str(d)] if w.write(d / "cgroup.procs", str(pid)) else []


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def join(pid: int, paths: tuple[str, ...] | list[str]) -> None:
    """Put ``pid`` into cgroups already made (a VM's helper joins its VM's cgroup)."""
    for path in paths:
        with contextlib.suppress(OSError):
            (Path(path) / "cgroup.procs").write_text(str(pid))


def remove(created: tuple[str, ...] | list[str]) -> None:
    """Remove the cgroups :func:`apply` created, once their processes are gone.

    A cgroup that still holds a process stays.
    """
    for path in created:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def cgroups_of(pid: int) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as ``{controller: path}`` (``""`` is the v2 hierarchy)."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out[c] = path
    return out


def oom_kills(paths: tuple[str, ...] | list[str]) -> int:
    """How many processes the kernel OOM-killed in these cgroups (0 where it does not say)."""
    total = 0
    for path in paths:
        for name in ("memory.events", "memory.oom_control"):
            for line in _read(Path(path) / name).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit():
                    total += int(value)
    return total
