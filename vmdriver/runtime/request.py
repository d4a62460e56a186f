"""What a face hands the supervisor to run one VM, and how it wants it confined."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmdriver.runtime import cgroup
from vmdriver.runtime.taskdir import VMDirs
from vmdriver.spec import VMSpec

if TYPE_CHECKING:
    from vmdriver.qemu.monitor import Monitor

#: Runs one QMP command on a VM: ``await qmp("query-status", None)``.
QmpCall = Callable[[str, "dict[str, Any] | None"], Awaitable[Any]]


@dataclass(frozen=True)
class Confinement:
    """The cgroup a VM's processes go into, as a Nomad client would make it.

    Only applied as root: elsewhere cgroups are not ours to write, and the VM
    runs unconfined (the placement's warnings say so).
    """

    #: Parent cgroup (``vmdriver`` for `vmdriver run`, ``nomad`` for the plugin).
    parent: str
    #: The VM's own cgroup name (no ``/``).
    scope: str
    #: Nomad's scheduler limit (max(memory, memory_max)) in MiB; 0: unset.
    task_limit_mib: int = 0
    cpu_shares: int | None = None
    #: Host CPUs in cgroup list syntax, when cores were reserved and there is no cpuset cgroup.
    cpuset_cpus: str = ""
    #: A cpuset cgroup the scheduler already made for the task.
    cpuset_cgroup: str = ""

    def limits(self, spec: VMSpec, accelerator: str) -> cgroup.CgroupLimits:
        """The limits once the accelerator is known."""
        cpus = self.cpuset_cpus or ",".join(map(str, spec.resources.cpuset))
        return cgroup.limits_for(spec.resources, accelerator,
                                 task_limit_mib=self.task_limit_mib or None,
                                 cpu_shares=self.cpu_shares,
                                 cpuset_cpus="" if self.cpuset_cgroup else cpus)

    @staticmethod
    def available() -> bool:
        """True where this process may create cgroups."""
        return os.geteuid() == 0


@dataclass(frozen=True)
class LaunchRequest:
    """One VM to run: the spec, its places, its environment and its confinement."""

    vm_id: str
    spec: VMSpec
    dirs: VMDirs
    #: The environment a face wants QEMU and helpers to see (filtered before use).
    env: Mapping[str, str] = field(default_factory=dict)
    #: Serial console and QEMU's stderr; ``None``: the task dir's log files.
    stdout: Path | None = None
    stderr: Path | None = None
    confinement: Confinement | None = None
    #: Remove the task dir when the VM ends (`vmdriver run`); Nomad removes its own.
    remove_task_dir: bool = False
    #: Where errors point (``job.hcl: task "web"``).
    where: str = ""
    #: Host dirs this VM's drives may come from besides the host config's ``image_paths``
    #: (a face's own storage, e.g. the pool volumes it made for the task).
    image_paths: tuple[Path, ...] = ()
    #: Loads the VM's state (a snapshot, a suspend, a live migration) into a QEMU started
    #: with ``spec.incoming``, before ``cont`` (see :mod:`vmdriver.runtime.snapshots`).
    incoming: Callable[[Monitor], Awaitable[None]] | None = None
    #: Changes the face makes over QMP while QEMU is still paused, before ``cont`` (the
    #: runner hot-plugs vCPUs here, as VM-Operator does). An error aborts the launch.
    configure: Callable[[QmpCall], Awaitable[None]] | None = None
