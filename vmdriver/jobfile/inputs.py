"""What every Nomad task dialect shares: the task facts a face hands over, bounded.

A dialect (:mod:`vmdriver.jobfile.qemu`, :mod:`vmdriver.jobfile.virt`) turns its
own ``config {}`` plus these :class:`TaskInputs` into a :class:`~vmdriver.spec.VMSpec`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from vmdriver.errors import SpecError
from vmdriver.spec import Resources, ShutdownPolicy, StopSignal, defaults
from vmdriver.units import check_hostname

#: Nomad bounds on ``resources.memory`` (MB).
MIN_MEMORY_MB = 128
MAX_MEMORY_MB = 4_000_000


@dataclass(frozen=True)
class AllocatedPort:
    """A port the scheduler (or `vmdriver run`) gave the task."""

    label: str
    host_port: int
    to: int | None = None


@dataclass(frozen=True)
class TaskInputs:
    """What a face knows about a task besides its config."""

    name: str
    where: str
    memory_mb: int = defaults.MEMORY_MIB
    memory_max_mb: int | None = None
    cores: int | None = None
    cpu_shares: int | None = None
    cpuset: tuple[int, ...] = ()
    kill_timeout_s: float = defaults.KILL_TIMEOUT_S
    kill_signal: str = defaults.KILL_SIGNAL
    env: dict[str, str] = field(default_factory=dict)
    ports: tuple[AllocatedPort, ...] = ()
    dns_servers: tuple[str, ...] = ()
    dns_searches: tuple[str, ...] = ()
    #: Host memory in MB, the upper bound for ``memory``.
    host_memory_mb: int | None = None


def task_resources(inputs: TaskInputs) -> Resources:
    """Nomad's resources block, bounded, as the spec's resources."""
    where = f"{inputs.where}.resources"
    top = min(MAX_MEMORY_MB, inputs.host_memory_mb or MAX_MEMORY_MB)
    if not MIN_MEMORY_MB <= inputs.memory_mb <= top:
        raise SpecError("memory out of bounds", where=f"{where}.memory", value=inputs.memory_mb,
                        allowed=f"{MIN_MEMORY_MB} to {top} (MB)")
    mmax = inputs.memory_max_mb
    if mmax is not None and mmax not in (0, -1) and mmax < inputs.memory_mb:
        raise SpecError("memory_max is below memory", where=f"{where}.memory_max", value=mmax,
                        allowed=f">= {inputs.memory_mb}, or -1 for no limit")
    if inputs.cores is not None and not 1 <= inputs.cores <= 1024:
        raise SpecError("cores out of bounds", where=f"{where}.cores", value=inputs.cores,
                        allowed="1 to 1024")
    return Resources(
        memory_mib=inputs.memory_mb,
        memory_max_mib=mmax if mmax and mmax > 0 else None,
        cores=inputs.cores,
        cpu_shares=inputs.cpu_shares,
        cpuset=inputs.cpuset,
    )


def stop_policy(inputs: TaskInputs, *, graceful: bool, via_agent: bool = False) -> ShutdownPolicy:
    """``kill_signal``/``kill_timeout`` as the spec's shutdown policy."""
    try:
        signal = StopSignal.parse(inputs.kill_signal)
    except ValueError:
        raise SpecError("unsupported kill_signal", where=f"{inputs.where}.kill_signal",
                        value=inputs.kill_signal, allowed=[s.value for s in StopSignal]) from None
    return ShutdownPolicy(graceful=graceful, via_agent=via_agent, timeout_s=inputs.kill_timeout_s,
                          signal=signal)


def check_dns(inputs: TaskInputs) -> None:
    """DNS servers must be IP addresses, search domains hostnames."""
    for server in inputs.dns_servers:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise SpecError("not an IP address", where=f"{inputs.where}.network.dns.servers",
                            value=server) from None
    for search in inputs.dns_searches:
        check_hostname(search, where=f"{inputs.where}.network.dns.searches")
