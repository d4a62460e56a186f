"""How much one job may ask of the host: RAM, vCPUs, forwarded ports.

The bounds come from the host config (``max_memory``, ``max_vcpus``,
``max_ports``) and hold however the job asks: through ``resources`` or through
``args`` (``-m``, ``-smp``, memory backends). ``-overcommit mem-lock=on`` is
refused outright: it pins all guest RAM in host memory.

Numbers in args are read as QEMU reads them, but only in their decimal
spelling: QEMU also takes ``0x`` hex in sizes and counts, and a value this
module could not bound is refused rather than passed on.
"""

from __future__ import annotations

import os
import re
from fractions import Fraction

from vmdriver.errors import PolicyError, SpecError
from vmdriver.host.config import HostConfig
from vmdriver.qemu.cmdline import Pair

__all__ = ["ArgBounds", "check_resources", "host_memory_bytes", "max_memory_bytes"]

MIB = 1 << 20
#: QEMU's size suffixes (``qemu_strtosz``): binary, case-insensitive.
_SIZE = re.compile(r"^([0-9]{1,20}(?:\.[0-9]{1,20})?)([bkmgtpe]?)$", re.IGNORECASE | re.ASCII)
_SHIFT = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_COUNT = re.compile(r"^[0-9]{1,9}$", re.ASCII)
_SMP_FACTORS = ("sockets", "dies", "clusters", "cores", "threads")


def host_memory_bytes() -> int:
    """This host's RAM."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def max_memory_bytes(host: HostConfig) -> int:
    """``max_memory`` in bytes, the host's RAM when unset."""
    return host.bytes_of("max_memory") or host_memory_bytes()


def qemu_size(value: object, *, default_unit: str, where: str, what: str) -> int:
    """A size as QEMU's ``qemu_strtosz`` reads it (``512`` is ``default_unit``), decimal only."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SpecError(f"{what} must be a size", where=where, value=value)
    if isinstance(value, int):
        return value
    m = _SIZE.match(value.strip())
    if m is None:
        raise SpecError(f"{what} is not a size vmdriver can bound", where=where, value=value,
                        allowed="a decimal number with an optional K, M, G or T suffix")
    unit = (m.group(2) or default_unit).lower()
    size = Fraction(m.group(1)) * (1 << _SHIFT[unit])
    return int(size)


def _count(value: object, *, where: str, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _COUNT.match(value.strip()):
        return int(value.strip())
    raise SpecError(f"{what} is not a count vmdriver can bound", where=where, value=value,
                    allowed="a decimal number")


class ArgBounds:
    """Memory and vCPUs asked for in one job's args, checked as each option is read."""

    def __init__(self, host: HostConfig) -> None:
        self.max_memory = max_memory_bytes(host)
        self.max_vcpus = host.max_vcpus
        self.backends = 0

    def _memory(self, size: int, *, where: str, value: str, what: str) -> None:
        if size > self.max_memory:
            raise PolicyError(f"{what} is more memory than this host allows a job", where=where,
                              value=value, allowed=f"at most {self.max_memory // MIB} MiB "
                              "(max_memory)")

    def _vcpus(self, count: int, *, where: str, value: str) -> None:
        if count > self.max_vcpus:
            raise PolicyError("more vCPUs than this host allows a job", where=where, value=value,
                              allowed=f"at most {self.max_vcpus} (max_vcpus)")

    def check(self, option: str, pairs: list[Pair], *, where: str, value: str) -> None:
        """Raise if ``-option``'s pairs ask for more than the host allows."""
        got = {k.replace("_", "-").lower(): v for k, v in pairs}
        if option == "m":
            for key in ("size", "maxmem"):
                if key in got:
                    size = qemu_size(got[key], default_unit="m", where=where, what=f"-m {key}")
                    self._memory(size, where=where, value=value, what=f"-m {key}")
        elif option == "smp":
            counts = {k: _count(v, where=where, what=f"-smp {k}") for k, v in got.items()
                      if k in ("cpus", "maxcpus", *_SMP_FACTORS)}
            product = 1
            for k in _SMP_FACTORS:
                product *= counts.get(k, 1)
            self._vcpus(max(counts.get("cpus", 1), counts.get("maxcpus", 1), product),
                        where=where, value=value)
        elif option == "object" and str(got.get("qom-type", "")).startswith("memory-backend"):
            size = qemu_size(got.get("size", 0), default_unit="b", where=where,
                             what="memory backend size")
            self.backends += size
            self._memory(self.backends, where=where, value=value, what="memory backends")
        elif option == "overcommit" and str(got.get("mem-lock", "off")).lower() != "off":
            raise PolicyError("-overcommit mem-lock pins all guest memory in host RAM",
                              where=where, value=value, allowed="mem-lock=off")


def check_resources(memory_mib: int, cores: int | None, forwards: int, host: HostConfig, *,
                    where: str) -> None:
    """The spec's own resources against the host bounds (every face, before launch)."""
    top = max_memory_bytes(host)
    if memory_mib * MIB > top:
        raise PolicyError("memory is more than this host allows a job",
                          where=f"{where}resources.memory", value=memory_mib,
                          allowed=f"at most {top // MIB} MiB (max_memory)")
    if cores is not None and cores > host.max_vcpus:
        raise PolicyError("more cores than this host allows a job", where=f"{where}resources.cores",
                          value=cores, allowed=f"at most {host.max_vcpus} (max_vcpus)")
    if forwards > host.max_ports:
        raise PolicyError("more forwarded ports than this host allows a task",
                          where=f"{where}ports", value=forwards,
                          allowed=f"at most {host.max_ports} (max_ports)")
