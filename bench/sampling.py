"""The stats benchmark's samplers: vmdriver's, plain psutil, and raw /proc reads.

Each sampler is built once for a set of QEMU pids (as a long-lived stats
stream would be) and then called once per tick. The CPU it costs is this
thread's CPU time around the call: sampling is synchronous, so nothing else
runs in between.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import psutil

Sampler = Callable[[], None]


def vmdriver_sampler(pids: list[int]) -> Sampler | str:
    """``vmdriver.runtime.stats.ProcessSampler`` per VM, or why it cannot be used."""
    try:
        from vmdriver.runtime.stats import ProcessSampler
    except ImportError as exc:
        return f"vmdriver.runtime.stats not available ({exc})"
    samplers = [ProcessSampler(pid) for pid in pids]

    def tick() -> None:
        for s in samplers:
            s.sample()

    return tick


def psutil_sampler(pids: list[int]) -> Sampler:
    """psutil's cheapest useful sample: CPU times and RSS in one ``oneshot``."""
    procs = [psutil.Process(pid) for pid in pids]

    def tick() -> None:
        for p in procs:
            with p.oneshot():
                p.cpu_times()
                p.memory_info()

    return tick


def raw_sampler(pids: list[int]) -> Sampler:
    """The floor: read ``/proc/PID/stat`` and ``/proc/PID/statm``, parse nothing else."""
    paths = [(f"/proc/{pid}/stat", f"/proc/{pid}/statm") for pid in pids]

    def tick() -> None:
        for stat, statm in paths:
            with open(stat, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
                _ = int(fields[11]) + int(fields[12])
            with open(statm, "rb") as f:
                _ = int(f.read().split()[1])

    return tick


async def measure(pids: list[int], ticks: int, interval: float) -> dict[str, object]:
    """CPU seconds per tick of each sampler over ``ticks`` ticks, interleaved within each tick."""
    samplers: dict[str, Sampler] = {}
    skipped: dict[str, str] = {}
    vmd = vmdriver_sampler(pids)
    if isinstance(vmd, str):
        skipped["vmdriver"] = vmd
    else:
        samplers["vmdriver"] = vmd
    samplers["psutil"] = psutil_sampler(pids)
    samplers["raw"] = raw_sampler(pids)
    cpu: dict[str, list[float]] = {name: [] for name in samplers}
    order = list(samplers)
    proc0, wall0 = time.process_time(), time.monotonic()
    sampling = 0.0
    for i in range(ticks + 1):
        start = time.monotonic()
        # Rotate the order so no sampler always runs with a warm cache.
        for name in order[i % len(order) :] + order[: i % len(order)]:
            c0 = time.thread_time()
            samplers[name]()
            dt = time.thread_time() - c0
            sampling += dt
            if i > 0:  # the first tick warms up (psutil caches, page cache)
                cpu[name].append(dt)
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - start)))
    # What the worker process spent besides sampling: the supervisor idling with these VMs.
    idle = (time.process_time() - proc0 - sampling) / (time.monotonic() - wall0)
    return {"cpu": cpu, "skipped": skipped, "vms": len(pids), "interval": interval,
            "idle_cpu_fraction": idle}
