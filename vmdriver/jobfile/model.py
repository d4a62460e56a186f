"""The parts of a Nomad job file vmdriver reads: job → group → task, networks, resources.

Unknown job-level and group-level keys are ignored (a job file is also read by
Nomad, which owns them); task keys vmdriver acts on are checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmdriver.errors import JobFileError
from vmdriver.hclfile import blocks, labelled, load, one_block
from vmdriver.spec import ArtifactSpec, defaults
from vmdriver.units import check_name, parse_duration, parse_port

#: Port labels become env names (``NOMAD_PORT_<label>``) and host ports.
_LABEL = re.compile(r"^[A-Za-z0-9_-]{1,64}$", re.ASCII)
#: Most port labels one network block may declare: each may take a host port while the
#: job is planned (the operator's ``max_ports`` bounds the forwarded ones at launch).
MAX_PORT_LABELS = 256
#: An env name a process can be given (no ``=``, no NUL).
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$", re.ASCII)


@dataclass(frozen=True)
class Port:
    """A ``port "label" { static, to }`` entry."""

    label: str
    static: int | None = None
    to: int | None = None


@dataclass(frozen=True)
class Network:
    """A ``network { }`` block."""

    mode: str = "host"
    ports: tuple[Port, ...] = ()
    dns_servers: tuple[str, ...] = ()
    dns_searches: tuple[str, ...] = ()


@dataclass(frozen=True)
class Task:
    """A ``task "name" { }`` block."""

    name: str
    driver: str
    where: str
    config: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    kill_timeout_s: float = defaults.KILL_TIMEOUT_S
    kill_signal: str = defaults.KILL_SIGNAL
    env: dict[str, str] = field(default_factory=dict)
    artifacts: tuple[ArtifactSpec, ...] = ()
    networks: tuple[Network, ...] = ()


@dataclass(frozen=True)
class Group:
    """A ``group "name" { }`` block."""

    name: str
    count: int
    networks: tuple[Network, ...]
    tasks: tuple[Task, ...]


@dataclass(frozen=True)
class Job:
    """A parsed job file."""

    name: str
    path: Path
    groups: tuple[Group, ...]

    def tasks(self, driver: str | None = None) -> list[tuple[Group, Task]]:
        """``(group, task)`` pairs, optionally only those using ``driver``."""
        return [(g, t) for g in self.groups for t in g.tasks if driver in (None, t.driver)]


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise JobFileError("expected a string", where=where, value=value)
    return value


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise JobFileError("expected a list of strings", where=where, value=value)
    return tuple(value)


def _network(body: dict[str, Any], where: str) -> Network:
    ports = []
    declared = labelled(body.get("port"), f"{where}.port")
    if len(declared) > MAX_PORT_LABELS:
        raise JobFileError("too many ports in one network block", where=where,
                           value=len(declared), allowed=f"at most {MAX_PORT_LABELS}")
    for label, pbody in declared:
        pw = f"{where}.port {label!r}"
        if not _LABEL.match(label):
            raise JobFileError("not a port label", where=pw, value=label,
                               allowed="1-64 ASCII letters, digits, '_' and '-'")
        unknown = set(pbody) - {"static", "to", "host_network"}
        if unknown:
            raise JobFileError("unknown key in port", where=pw, value=sorted(unknown)[0],
                               allowed="static, to, host_network")
        static = parse_port(pbody["static"], where=f"{pw}.static") if "static" in pbody else None
        to = parse_port(pbody["to"], where=f"{pw}.to") if "to" in pbody else None
        ports.append(Port(label, static, to))
    labels = [p.label for p in ports]
    if len(set(labels)) != len(labels):
        raise JobFileError("port label declared twice", where=where)
    dns = one_block(body.get("dns"), f"{where}.dns")
    mode = body.get("mode", "host")
    return Network(
        mode=_str(mode, f"{where}.mode"),
        ports=tuple(ports),
        dns_servers=_str_list(dns.get("servers"), f"{where}.dns.servers"),
        dns_searches=_str_list(dns.get("searches"), f"{where}.dns.searches"),
    )


def _artifact(body: dict[str, Any], where: str) -> ArtifactSpec:
    unknown = set(body) - {"source", "destination", "mode", "options", "headers"}
    if unknown:
        raise JobFileError("unknown key in artifact", where=where, value=sorted(unknown)[0],
                           allowed="source, destination, mode, options, headers")
    if "source" not in body:
        raise JobFileError("artifact needs a source", where=where)
    mode = body.get("mode", "any")
    if mode not in ("any", "file", "dir"):
        raise JobFileError("invalid artifact mode", where=f"{where}.mode", value=mode,
                           allowed="any, file, dir")

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        raw = one_block(body.get(key), f"{where}.{key}")
        for k, v in raw.items():
            _str(v, f"{where}.{key}.{k}")
        return tuple(sorted(raw.items()))

    return ArtifactSpec(
        source=_str(body["source"], f"{where}.source"),
        destination=_str(body.get("destination", "local/"), f"{where}.destination"),
        mode=mode,
        options=pairs("options"),
        headers=pairs("headers"),
    )


def _task(name: str, body: dict[str, Any], where: str) -> Task:
    driver = _str(body.get("driver", ""), f"{where}.driver")
    env = one_block(body.get("env"), f"{where}.env")
    env_out = {}
    for k, v in env.items():
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise JobFileError("env values must be strings", where=f"{where}.env.{k}", value=v)
        if not _ENV_NAME.match(k):
            raise JobFileError("not an env name", where=f"{where}.env", value=k,
                               allowed="ASCII letters, digits, '_', '.', '-'; not starting "
                               "with a digit")
        if "\x00" in str(v):
            raise JobFileError("env value holds a NUL byte", where=f"{where}.env.{k}", value=v)
        env_out[k] = str(v)
    kill_timeout = parse_duration(body.get("kill_timeout", defaults.KILL_TIMEOUT_S),
                                  where=f"{where}.kill_timeout")
    resources = one_block(body.get("resources"), f"{where}.resources")
    return Task(
        name=name,
        driver=driver,
        where=where,
        config=one_block(body.get("config"), f"{where}.config"),
        resources=resources,
        kill_timeout_s=kill_timeout,
        kill_signal=_str(body.get("kill_signal", defaults.KILL_SIGNAL), f"{where}.kill_signal"),
        env=env_out,
        artifacts=tuple(_artifact(b, f"{where}.artifact[{i}]")
                        for i, b in enumerate(blocks(body.get("artifact"), where))),
        networks=tuple(_network(b, f"{where}.network")
                       for b in blocks(resources.get("network"), where)),
    )


def parse_job(data: dict[str, Any], path: Path) -> Job:
    """Build a :class:`Job` from parsed HCL."""
    jobs = labelled(data.get("job"), str(path))
    if len(jobs) != 1:
        raise JobFileError("a job file must hold exactly one job block", where=str(path))
    job_name, job_body = jobs[0]
    # Names become paths (task dirs, cgroups, volumes): checked before anything uses them.
    check_name(job_name, where=f"{path}: job", what="job name")
    groups = []
    for gname, gbody in labelled(job_body.get("group"), f"{path}: job {job_name!r}"):
        gwhere = f"{path}: group {gname!r}"
        check_name(gname, where=f"{path}: group", what="group name")
        count = gbody.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 64:
            raise JobFileError("count must be a whole number from 0 to 64",
                               where=f"{gwhere}.count", value=count)
        nets = tuple(_network(b, f"{gwhere}.network")
                     for b in blocks(gbody.get("network"), gwhere))
        tasks = tuple(_task(check_name(tname, where=f"{gwhere}: task", what="task name"),
                            tbody, f"{path}: task {tname!r}")
                      for tname, tbody in labelled(gbody.get("task"), gwhere))
        groups.append(Group(gname, count, nets, tasks))
    return Job(job_name, path, tuple(groups))


def load_job(path: Path) -> Job:
    """Read and parse a job file."""
    return parse_job(load(path), path)
