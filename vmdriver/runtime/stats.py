"""Resource usage of a QEMU process, sampled with psutil.

Any face can use it: the Nomad plugin streams it as TaskStats, the CLI or a
runner can print it. CPU percentages are of one host core (a VM busy on two
vCPUs shows ~200 %), as Nomad reports them; "ticks" are MHz consumed, Nomad's
unit for CPU resources.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

#: Used when the host reports no CPU frequency at all.
FALLBACK_MHZ = 1000.0


@functools.cache
def cpu_mhz() -> float:
    """Speed of one host core in MHz (psutil, else /proc/cpuinfo, else a guess)."""
    freq = None
    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError):
        freq = None
    if freq is not None and (freq.max or freq.current):
        return float(freq.max or freq.current)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return FALLBACK_MHZ


@dataclass(frozen=True)
class ProcessSample:
    """One measurement of a process."""

    #: Unix time of the sample.
    timestamp: float
    #: Resident memory in bytes.
    rss: int
    #: Swapped-out memory in bytes (0 where the kernel does not say).
    swap: int
    #: CPU seconds since the process started.
    user_s: float
    system_s: float
    #: Share of one core since the previous sample (0 on the first).
    user_percent: float
    system_percent: float

    @property
    def cpu_percent(self) -> float:
        """User plus system, in percent of one core."""
        return self.user_percent + self.system_percent

    @property
    def total_ticks(self) -> float:
        """CPU used, in MHz (Nomad's ``total_ticks``)."""
        return self.cpu_percent / 100.0 * cpu_mhz()


class ProcessSampler:
    """Samples one process; percentages are over the time between two :meth:`sample` calls."""

    def __init__(self, pid: int) -> None:
        """Raises :class:`psutil.NoSuchProcess` if ``pid`` is gone."""
        self.pid = pid
        self._proc = psutil.Process(pid)
        self._last: tuple[float, float, float] | None = None

    def sample(self) -> ProcessSample:
        """Measure now. Raises :class:`psutil.NoSuchProcess` once the process is gone."""
        now = time.time()
        with self._proc.oneshot():
            times = self._proc.cpu_times()
            rss, swap = self._memory()
        user_pct = sys_pct = 0.0
        if self._last is not None:
            t0, u0, s0 = self._last
            dt = now - t0
            if dt > 0:
                user_pct = max(0.0, (times.user - u0) / dt * 100.0)
                sys_pct = max(0.0, (times.system - s0) / dt * 100.0)
        self._last = (now, times.user, times.system)
        return ProcessSample(now, rss, swap, times.user, times.system, user_pct, sys_pct)

    def _memory(self) -> tuple[int, int]:
        # RSS from statm, swap from /proc/PID/status: ~40 us together. memory_full_info
        # reads smaps_rollup, ~0.5 ms per QEMU process (1.6 % of a core at 32 VMs/s, bench/).
        return int(self._proc.memory_info().rss), _swap_bytes(self.pid)


def _swap_bytes(pid: int) -> int:
    """``VmSwap`` of ``/proc/PID/status`` in bytes; 0 where the kernel does not say."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmSwap:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
