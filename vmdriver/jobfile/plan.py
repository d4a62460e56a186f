"""Turning a job file into runnable tasks on this machine (`vmdriver run` and `argv`).

This is the part Nomad's scheduler and client would do: pick host ports,
lay out task dirs, build the task environment and interpolate ``${...}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from vmdriver.errors import HostConfigError, JobFileError, SpecError
from vmdriver.host.config import HostConfig
from vmdriver.jobfile.dialects import DIALECTS
from vmdriver.jobfile.inputs import AllocatedPort, TaskInputs
from vmdriver.jobfile.model import Group, Job, Network, Task
from vmdriver.jobfile.placement import Placement
from vmdriver.runtime.request import Confinement, LaunchRequest
from vmdriver.runtime.taskdir import TaskDir, VMDirs
from vmdriver.spec import ArtifactSpec, VMSpec, defaults
from vmdriver.units import check_name

#: Nomad's default dynamic port range.
DYNAMIC_PORTS = range(20000, 32000)
_INTERP = re.compile(r"\$\{([A-Za-z0-9_.\-]+)\}")


@dataclass(frozen=True)
class TaskPlan:
    """One task ready to launch."""

    alloc_id: str
    group: str
    task: Task
    spec: VMSpec
    task_dir: TaskDir
    env: dict[str, str]
    ports: tuple[AllocatedPort, ...]
    artifacts: tuple[ArtifactSpec, ...]
    #: The dialect's validated config and the task facts, for :func:`provision`.
    config: Any = None
    inputs: TaskInputs | None = None
    #: Extra image dirs for this VM (its dialect's pool volumes), set by :func:`provision`.
    image_paths: tuple[Path, ...] = ()

    @property
    def vm_id(self) -> str:
        """Nomad's task id form: ``<alloc id>/<task>``."""
        return f"{self.alloc_id}/{self.task.name}"

    def request(self, state_dir: Path) -> LaunchRequest:
        """The supervisor's request for this task, as `vmdriver run` runs it."""
        return LaunchRequest(
            vm_id=self.vm_id, spec=self.spec,
            dirs=VMDirs.under(state_dir, self.vm_id, self.task_dir), env=self.env,
            confinement=Confinement(parent="vmdriver", scope=f"{self.alloc_id[:8]}.{self.task.name}"),
            remove_task_dir=True, where=self.task.where, image_paths=self.image_paths,
        )


def provision(plan: TaskPlan, host: HostConfig, *, preview: bool = False) -> TaskPlan:
    """The plan with what its dialect makes on the host (volumes, seed): after the artifacts.

    ``preview`` only shows it (`vmdriver argv`): nothing is made.
    """
    if plan.inputs is None:
        return plan
    made = DIALECTS[plan.task.driver].provision(
        plan.config, plan.inputs, plan.spec,
        Placement(host, plan.alloc_id, plan.task_dir, preview=preview))
    return dataclasses.replace(plan, spec=made.spec, image_paths=made.image_paths)


def release(plan: TaskPlan, host: HostConfig) -> list[str]:
    """Undo :func:`provision` (the task's volumes go); the names removed."""
    return DIALECTS[plan.task.driver].release(host, plan.alloc_id, plan.task.name)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
        s.bind(("0.0.0.0", port))
        return True
    return False


def allocate_ports(networks: list[Network], taken: set[int], where: str,
                   check_static: bool = True,
                   labels: tuple[str, ...] = ()) -> list[AllocatedPort]:
    """Static ports as given (refused if taken); dynamic ones get a free port from Nomad's range.

    ``labels`` are labels already declared (the group's, for a task's own ports).
    """
    out: list[AllocatedPort] = []
    seen: set[str] = set(labels)
    candidates = iter(DYNAMIC_PORTS)
    for net in networks:
        for port in net.ports:
            if port.label in seen:
                raise JobFileError("port label declared twice", where=where, value=port.label)
            seen.add(port.label)
            if port.static is not None:
                host = port.static
                if check_static and (host in taken or not _port_free(host)):
                    raise SpecError(f"static port {host} is already in use on this host",
                                    where=f"{where}.network.port {port.label!r}.static",
                                    allowed="a free port, or no static for a dynamic one")
            else:
                host = next((p for p in candidates if p not in taken and _port_free(p)), 0)
                if not host:
                    raise SpecError("no free port in the dynamic range", where=where)
            taken.add(host)
            out.append(AllocatedPort(port.label, host, port.to))
    return out


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Replace ``${NAME}`` and ``${env.NAME}`` as Nomad's client does; leave unknown ones."""
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            key = m.group(1)
            key = key[4:] if key.startswith("env.") else key
            return env.get(key, m.group(0))

        return _INTERP.sub(sub, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def _int(res: dict[str, Any], key: str, default: int | None, where: str) -> int | None:
    value = res.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError("expected a whole number", where=f"{where}.resources.{key}", value=value)
    return value


def task_env(job: Job, group: Group, task: Task, alloc: TaskDir, alloc_id: str,
             ports: list[AllocatedPort], memory: int, cpu: int) -> dict[str, str]:
    """The NOMAD_* variables a Nomad client would set, then the task's own env."""
    env = {
        "NOMAD_JOB_NAME": job.name, "NOMAD_GROUP_NAME": group.name,
        "NOMAD_TASK_NAME": task.name, "NOMAD_ALLOC_ID": alloc_id,
        "NOMAD_ALLOC_DIR": str(alloc.shared), "NOMAD_TASK_DIR": str(alloc.local),
        "NOMAD_SECRETS_DIR": str(alloc.secrets), "NOMAD_MEMORY_LIMIT": str(memory),
        "NOMAD_CPU_LIMIT": str(cpu),
    }
    for p in ports:
        env[f"NOMAD_HOST_PORT_{p.label}"] = str(p.host_port)
        env[f"NOMAD_PORT_{p.label}"] = str(p.to or p.host_port)
        env[f"NOMAD_ADDR_{p.label}"] = f"127.0.0.1:{p.host_port}"
    env.update({k: interpolate(v, env) for k, v in task.env.items()})
    return env


def check_state_dir(state_dir: Path) -> None:
    """Refuse a state dir that cannot hold task dirs, before anything is made in it.

    The dir or its nearest existing parent must be a directory this user can write
    (``access`` also says no on a read-only file system): a file in the way or a
    read-only place is one error line, not a traceback halfway through a run.
    """
    path = state_dir
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    if not path.is_dir():
        why = "is not a directory"
    elif not os.access(path, os.W_OK | os.X_OK):
        why = "is not writable"
    else:
        return
    raise HostConfigError(f"state dir cannot be used: {path} {why}", where="state_dir",
                          value=str(state_dir))


def plan_job(job: Job, state_dir: Path, host_memory_mb: int | None = None,
             new_alloc_id: Callable[[], str] = lambda: str(uuid.uuid4()),
             check_ports: bool = True) -> list[TaskPlan]:
    """Plan every qemu task of ``job`` (``count`` instances of each group).

    ``check_ports=False`` skips checking that static ports are free and that the
    state dir can be written (for showing the argv of a job that may already be
    running: nothing is made).
    """
    if check_ports:
        check_state_dir(state_dir)
    if host_memory_mb is None:
        host_memory_mb = psutil.virtual_memory().total // (1024 * 1024)
    plans: list[TaskPlan] = []
    taken: set[int] = set()
    for group in job.groups:
        tasks = [t for t in group.tasks if t.driver in DIALECTS]
        for _ in range(group.count if tasks else 0):
            alloc_id = new_alloc_id()
            # Group ports belong to the allocation: every task of it shares them.
            group_ports = allocate_ports(list(group.networks), taken,
                                         f"{job.path}: group {group.name!r}", check_ports)
            for task in tasks:
                task_ports = allocate_ports(list(task.networks), taken, task.where, check_ports,
                                            labels=tuple(p.label for p in group_ports))
                plans.append(_plan_task(job, group, task, alloc_id, state_dir,
                                        (*group_ports, *task_ports), host_memory_mb))
    if not plans:
        raise JobFileError("job has no task with a driver vmdriver runs", where=str(job.path),
                           allowed=[f'driver = "{name}"' for name in DIALECTS])
    return plans


def _plan_task(job: Job, group: Group, task: Task, alloc_id: str, state_dir: Path,
               ports: tuple[AllocatedPort, ...], host_memory_mb: int) -> TaskPlan:
    where = task.where
    # A Job built in code skips the file's checks: names reach paths only through here.
    check_name(task.name, where=where, what="task name")
    check_name(alloc_id, where=where, what="alloc id")
    lang = DIALECTS[task.driver]
    lang.parse(task.config, where)  # early, typed check before interpolation
    alloc = TaskDir(state_dir / "allocs" / alloc_id[:8], task.name)
    res = task.resources
    memory = defaults.MEMORY_MIB if (mem := _int(res, "memory", defaults.MEMORY_MIB, where)) is None else mem
    cpu = _int(res, "cpu", defaults.CPU_MHZ, where) or defaults.CPU_MHZ
    env = task_env(job, group, task, alloc, alloc_id, list(ports), memory, cpu)
    cfg = lang.parse(interpolate(task.config, env), where)
    dns = next((n for n in (*task.networks, *group.networks) if n.dns_servers or n.dns_searches),
               None)
    inputs = TaskInputs(
        name=task.name, where=where, memory_mb=memory,
        memory_max_mb=_int(res, "memory_max", None, where), cores=_int(res, "cores", None, where),
        cpu_shares=cpu, kill_timeout_s=task.kill_timeout_s, kill_signal=task.kill_signal,
        env=env, ports=ports, dns_servers=dns.dns_servers if dns else (),
        dns_searches=dns.dns_searches if dns else (), host_memory_mb=host_memory_mb,
    )
    spec = lang.build(cfg, inputs)
    # Nomad interpolates artifact blocks too (e.g. a source built from ${NOMAD_META_x}).
    artifacts = tuple(ArtifactSpec.model_validate(interpolate(a.model_dump(mode="json"), env))
                      for a in (*task.artifacts, *lang.artifacts(cfg)))
    return TaskPlan(alloc_id, group.name, task, spec, alloc, env, ports, artifacts, cfg, inputs)
