"""From Nomad's TaskConfig message to the inputs the shared core takes.

The task config is decoded from msgpack and mapped by the same dialect
(:mod:`vmdriver.jobfile.dialects`) `vmdriver run` uses; this module only adds
what Nomad decided: the task dir, the allocated ports and resources, the log
FIFOs and the task's cgroups.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

from vmdriver.host.config import HostConfig
from vmdriver.jobfile.dialects import Dialect
from vmdriver.jobfile.inputs import AllocatedPort, TaskInputs
from vmdriver.jobfile.placement import Placement
from vmdriver.nomad.codec import decode_config
from vmdriver.nomad.proto import driver_pb2 as pb
from vmdriver.runtime.request import Confinement, LaunchRequest
from vmdriver.runtime.taskdir import TaskDir, VMDirs
from vmdriver.spec import VMSpec, defaults
from vmdriver.units import check_name

#: Task config attributes of HCL type number (see hclspec.TASK_TYPE_OVERRIDES).
NUMBER_KEYS = frozenset({"host_port", "guest_port"})
MIB = 1024 * 1024


@dataclass(frozen=True)
class StartPlan:
    """Everything StartTask decided before anything runs."""

    task_id: str
    alloc_id: str
    name: str
    spec: VMSpec
    task_dir: TaskDir
    stdout: Path | None
    stderr: Path | None
    env: dict[str, str]
    #: Nomad's scheduler limit (max(memory, memory_max)), 0 if unset.
    task_memory_limit_bytes: int
    cpu_shares: int | None
    cpuset_cpus: str
    cpuset_cgroup: str
    #: Extra image dirs for this VM (the pools its dialect made volumes in).
    image_paths: tuple[Path, ...] = ()

    def request(self, state_dir: Path) -> LaunchRequest:
        """The supervisor's request; control sockets and records go under ``state_dir``."""
        # Nomad's own cpuset cgroup already pins the CPUs; they are set only without it.
        confinement = Confinement(
            parent="nomad", scope=f"{self.alloc_id}.{self.name}",
            task_limit_mib=self.task_memory_limit_bytes // MIB, cpu_shares=self.cpu_shares,
            cpuset_cpus=self.cpuset_cpus, cpuset_cgroup=self.cpuset_cgroup)
        return LaunchRequest(
            vm_id=self.task_id, spec=self.spec,
            dirs=VMDirs.under(state_dir, self.task_id, self.task_dir), env=self.env,
            stdout=self.stdout, stderr=self.stderr, confinement=confinement, where=self.name,
            image_paths=self.image_paths)


def _ports(res: pb.Resources) -> tuple[AllocatedPort, ...]:
    ports = [AllocatedPort(p.label, p.value, p.to or None) for p in res.ports]
    if not ports:
        # Older clients only fill the network resources.
        for net in res.allocated_resources.networks:
            for p in (*net.reserved_ports, *net.dynamic_ports):
                ports.append(AllocatedPort(p.label, p.value, None))
    return tuple(ports)


def _cpu_count(cpus: str) -> int:
    count = 0
    for part in filter(None, cpus.split(",")):
        lo, _, hi = part.partition("-")
        count += int(hi) - int(lo) + 1 if hi else 1
    return count


def plan_start(task: pb.TaskConfig, dialect: Dialect, host: HostConfig | None = None) -> StartPlan:
    """Decode and check a StartTask request, then let the dialect provision the VM.

    Raises InputError with the field at fault. What ``provision`` made (volumes)
    is the caller's to release if the launch fails.
    """
    # Both become paths (task dir, cgroup scope, volume names): Nomad's own rules, checked first.
    check_name(task.name, where="task", what="task name")
    check_name(task.alloc_id, where=f"task {task.name!r}: alloc id", what="alloc id")
    where = task.name or "task"
    raw = decode_config(task.msgpack_driver_config, where=f"{where}.config", numbers=NUMBER_KEYS)
    cfg = dialect.parse(raw, where)
    res = task.resources
    linux = res.linux_resources
    mem = res.allocated_resources.memory
    memory_mb = int(mem.memory_mb) or (int(linux.memory_limit_bytes) // MIB) or defaults.MEMORY_MIB
    reserved = "reserve" in linux.cpuset_cgroup or (linux.cpuset_cpus and not linux.cpuset_cgroup)
    cores = _cpu_count(linux.cpuset_cpus) if reserved and linux.cpuset_cpus else None
    shares = int(linux.cpu_shares or res.allocated_resources.cpu.cpu_shares) or None
    inputs = TaskInputs(
        name=task.name,
        where=where,
        memory_mb=memory_mb,
        memory_max_mb=int(mem.memory_max_mb) or None,
        cores=cores,
        cpu_shares=shares,
        env=dict(task.env),
        ports=_ports(res),
        dns_servers=tuple(task.dns.servers),
        dns_searches=tuple(task.dns.searches),
        host_memory_mb=psutil.virtual_memory().total // MIB,
    )
    task_dir = TaskDir(Path(task.alloc_dir), task.name)
    made = dialect.provision(cfg, inputs, dialect.build(cfg, inputs),
                             Placement(host or HostConfig(), task.alloc_id, task_dir))
    return StartPlan(
        task_id=task.id, alloc_id=task.alloc_id, name=task.name, spec=made.spec,
        task_dir=task_dir, image_paths=made.image_paths,
        stdout=Path(task.stdout_path) if task.stdout_path else None,
        stderr=Path(task.stderr_path) if task.stderr_path else None,
        env=dict(task.env), task_memory_limit_bytes=int(linux.memory_limit_bytes),
        cpu_shares=shares, cpuset_cpus=linux.cpuset_cpus, cpuset_cgroup=linux.cpuset_cgroup,
    )
