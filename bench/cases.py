"""The benchmarks of ``python -m bench``. Each runs its arms interleaved, round by round.

start, jail, boot, burst, stats and scale live here; network, storage, seed, rbd and
snapshots are standalone modules (``python -m bench.NAME``) that the suite runs too.

Every benchmark adds :class:`~bench.results.Row` samples to a
:class:`~bench.results.Results`; none asserts anything (the targets are shown
in the report, not enforced).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.client import Worker, WorkerError, cli_boot
from bench.common import make_overlay, slope
from bench.libvirt import Libvirt
from bench.network import bench_network
from bench.rbd import bench_rbd
from bench.results import FLOOR, JAIL_COST, JAIL_OFF, JAIL_START, JAILED, Results
from bench.standalone import bench_seed, bench_snapshots, bench_storage


@dataclass(frozen=True)
class Sizes:
    """How much of each benchmark to run."""

    start_rounds: int = 30
    warmup: int = 3
    boot_rounds: int = 6
    burst_n: int = 32
    burst_rounds: int = 5
    stats_vms: int = 32
    stats_ticks: int = 30
    stats_interval: float = 1.0
    scale_top: int = 64
    scale_rounds: int = 2
    #: Boot the arms at the same time (smoke only: it skews the numbers, saves ~20 s).
    boot_parallel: bool = False
    #: storage: chained-disk rounds, MiB of data in its images, full-clone rounds and size.
    storage_rounds: int = 15
    storage_data_mib: int = 256
    clone_rounds: int = 5
    clone_mib: int = 512
    #: seed: seeds built per format.
    seed_rounds: int = 100
    #: snapshots: cold boots and single clones each; clones started at once.
    snapshot_rounds: int = 3
    snapshot_clones: int = 8


#: One pass of everything on tiny sizes, for the smoke test.
SMOKE = Sizes(start_rounds=1, warmup=0, boot_rounds=1, burst_n=2, burst_rounds=1, stats_vms=2,
              stats_ticks=2, stats_interval=0.1, scale_top=2, scale_rounds=1, boot_parallel=True,
              storage_rounds=1, storage_data_mib=4, clone_rounds=1, clone_mib=8, seed_rounds=2,
              snapshot_rounds=1, snapshot_clones=2)
SCALE_POINTS = (1, 2, 4, 8, 16, 32, 64)


def progress(msg: str) -> None:
    """One progress line on stderr."""
    sys.stderr.write(f"bench: {msg}\n")
    sys.stderr.flush()


@dataclass
class Env:
    """What the benchmarks share: workers, the optional libvirt, sizes, results."""

    vmd: Worker
    bare: Worker
    libvirt: Libvirt | None
    sizes: Sizes
    root: Path
    results: Results


def _order(i: int, arms: list[str]) -> list[str]:
    """Rotate the arms each round so none always goes first."""
    k = i % len(arms)
    return arms[k:] + arms[:k]


async def bench_start(env: Env) -> None:
    """start: request → VM running; forced stop of the same VM right after."""
    s, r = env.sizes, env.results
    arms = ["vmdriver", "bare"] + (["libvirt"] if env.libvirt else [])
    for i in range(s.warmup + s.start_rounds):
        keep = i >= s.warmup
        for arm in _order(i, arms):
            if arm == "libvirt":
                assert env.libvirt is not None
                name = f"b{i}"
                t = await env.libvirt.create(name)
                if not await env.libvirt.running(name):
                    raise RuntimeError(f"libvirt domain {name} not running after virsh create")
                k = await env.libvirt.destroy(name)
            else:
                w = env.vmd if arm == "vmdriver" else env.bare
                t = (await w.call("start", n=1))["each"][0]
                k = (await w.call("kill"))["each"][0]
            if keep:
                r.add("start", "request → running", arm, t * 1000, "ms")
                r.add("stop", "forced (SIGKILL / virsh destroy) → exit reported", arm, k * 1000, "ms")
        if i % 10 == 0:
            progress(f"start round {i + 1}/{s.warmup + s.start_rounds}")


async def _boot_once(env: Env, arm: str, i: int) -> None:
    """One boot of one arm, then its graceful stop."""
    r = env.results
    if arm == "vmdriver run":
        image = make_overlay(env.root / f"cli{i}" / "img" / "disk.qcow2")
        ready, stop = await cli_boot(env.root / f"cli{i}", image)
        r.add("boot", "request → guest ready line", arm, ready * 1000, "ms")
        r.add("stop", "graceful: request → exit reported", arm, stop * 1000, "ms")
        return
    w = env.vmd if arm == "vmdriver" else env.bare
    res = await w.call("start", n=1, kind="boot", timeout=300)
    r.add("boot", "request → guest ready line", arm, res["ready"][0] * 1000, "ms")
    off = await w.call("poweroff", timeout=120)
    r.add("stop", "graceful: request → exit reported", arm, off["call"][0] * 1000, "ms")
    r.add("stop", "graceful: guest power-off (SHUTDOWN) → exit reported", arm,
          off["after_shutdown"][0] * 1000, "ms")
    if off["kinds"][0] != "STOPPED":
        r.note(f"{arm} graceful stop ended as {off['kinds'][0]}, not STOPPED")


async def bench_boot(env: Env, guest_problem: str | None) -> None:
    """boot: request → the guest's readiness line; then a graceful stop (ACPI button)."""
    s, r = env.sizes, env.results
    if guest_problem:
        r.skip("boot", guest_problem)
        r.skip("stop (graceful)", guest_problem)
        return
    arms = ["vmdriver", "vmdriver run", "bare"]
    for i in range(s.boot_rounds):
        progress(f"boot round {i + 1}/{s.boot_rounds} (TCG guest boots, ~10 s each)")
        if s.boot_parallel:
            await asyncio.gather(*(_boot_once(env, arm, i) for arm in arms))
            continue
        for arm in _order(i, arms):
            await _boot_once(env, arm, i)


async def bench_burst(env: Env) -> None:
    """burst: N VMs requested at once; wall time, and supervisor PSS growth per VM."""
    s, r = env.sizes, env.results
    n = s.burst_n
    arms = ["vmdriver", "bare"] + (["libvirt"] if env.libvirt else [])
    label = f"{n} VMs at once → all running"
    for i in range(s.burst_rounds):
        progress(f"burst round {i + 1}/{s.burst_rounds}")
        for arm in _order(i, arms):
            if arm == "libvirt":
                assert env.libvirt is not None
                lv = env.libvirt
                names = [f"u{i}x{j}" for j in range(n)]
                for name in names:
                    lv.domain_file(name)
                t0 = asyncio.get_running_loop().time()
                await asyncio.gather(*(lv.create(name) for name in names))
                r.add("burst", label, arm, (asyncio.get_running_loop().time() - t0) * 1000, "ms")
                await asyncio.gather(*(lv.destroy(name) for name in names))
                continue
            w = env.vmd if arm == "vmdriver" else env.bare
            before = (await w.call("pss"))["pss_kib"]
            res = await w.call("start", n=n, timeout=300)
            after = (await w.call("pss"))["pss_kib"]
            await w.call("kill", timeout=120)
            r.add("burst", label, arm, res["wall"] * 1000, "ms")
            r.add("burst", "supervisor PSS per VM", arm, (after - before) / n / 1024, "MiB")


async def bench_stats(env: Env) -> None:
    """stats: CPU cost of sampling the VMs' QEMU processes once per interval."""
    s, r = env.sizes, env.results
    progress(f"stats: {s.stats_vms} VMs, {s.stats_ticks} ticks of {s.stats_interval:g} s")
    await env.vmd.call("start", n=s.stats_vms, timeout=300)
    try:
        await asyncio.sleep(min(5.0, s.stats_interval * 3))  # let SeaBIOS settle in the guests
        res = await env.vmd.call("stats", ticks=s.stats_ticks, interval=s.stats_interval,
                                 timeout=s.stats_ticks * s.stats_interval * 3 + 60)
    finally:
        await env.vmd.call("kill", timeout=120)
    label = f"sampling {res['vms']} VMs every {s.stats_interval:g} s: % of one core"
    names = {"vmdriver": "vmdriver", "psutil": "psutil (cpu_times+memory_info)", "raw": "bare"}
    for sampler, cpu in res["cpu"].items():
        for c in cpu:
            r.add("stats", label, names[sampler], c / s.stats_interval * 100, "%")
    for sampler, why in res["skipped"].items():
        r.skip("stats", f"{sampler} sampler: {why}")
    r.add("stats", f"supervisor idle with {res['vms']} VMs: % of one core", "vmdriver",
          res["idle_cpu_fraction"] * 100, "%")


async def bench_scale(env: Env) -> None:
    """scale: VMs started one after another up to the top; start time and PSS by count."""
    s, r = env.sizes, env.results
    points = [p for p in SCALE_POINTS if p <= s.scale_top] or [s.scale_top]
    for i in range(s.scale_rounds):
        for arm in _order(i, ["vmdriver", "bare"]):
            progress(f"scale round {i + 1}/{s.scale_rounds}: {arm}, 1 → {s.scale_top} VMs")
            w = env.vmd if arm == "vmdriver" else env.bare
            try:
                res = await w.call("scale", top=s.scale_top, checkpoints=points, timeout=900)
            finally:
                await w.call("kill", timeout=300)
            times = [t * 1000 for t in res["times"]]
            pss = {int(k): v / 1024 for k, v in res["pss"].items()}
            r.series(f"scale start ms/{arm}/{i}", list(range(1, len(times) + 1)), times)
            r.series(f"scale pss MiB/{arm}/{i}", list(pss), list(pss.values()))
            tail = times[-min(8, len(times)) :]
            r.add("scale", "start time, first VM", arm, times[0], "ms")
            r.add("scale", f"start time, VMs {s.scale_top - len(tail) + 1}-{s.scale_top} (median)",
                  arm, statistics.median(tail), "ms")
            r.add("scale", f"supervisor PSS slope over 0-{s.scale_top} VMs", arm,
                  slope([float(k) for k in pss], list(pss.values())), "MiB/VM")


async def _start_kill(w: Worker, n: int) -> float:
    """Start ``n`` VMs at once and kill them; seconds until all ran (one VM: its own start)."""
    try:
        res = await w.call("start", n=n, timeout=300)
    finally:
        await w.call("kill", timeout=120)  # also the VMs that did start when one failed
    return float(res["each"][0] if n == 1 else res["wall"])


async def _jail_bursts(env: Env, workers: dict[str, Worker]) -> None:
    """The jail case's bursts; an arm whose burst fails is noted and the others go on."""
    s, r = env.sizes, env.results
    rounds = min(s.burst_rounds, 3)
    failed: dict[str, list[str]] = {}
    for i in range(rounds):
        progress(f"jail burst round {i + 1}/{rounds}")
        for arm in _order(i, list(workers)):
            try:
                ms = await _start_kill(workers[arm], s.burst_n) * 1000
            except WorkerError as exc:
                failed.setdefault(arm, []).append(str(exc))
                continue
            r.add("jail", f"{s.burst_n} VMs at once → all running", arm, ms, "ms")
    for arm, errors in failed.items():
        r.note(f"jail: {arm}: {len(errors)} of {rounds} bursts of {s.burst_n} failed: {errors[0]}")


async def bench_jail(env: Env) -> None:
    """jail: start and burst with the default jail, with ``jail = "off"``, and bare QEMU.

    The jailed arm is a third worker whose Supervisor has the host config's default
    jail; the other two are the start case's workers. Interleaved round by round.
    """
    s, r = env.sizes, env.results
    jw = await Worker.open("vmdriver-jail", env.root / "j")
    try:
        await jw.call("start", n=1)  # warm-up: imports, the probe, the per-binary path list
        jailed = (await jw.call("argv"))["jailed"]
        await jw.call("kill")
        if not jailed:
            r.skip("jail", "the jail probe ruled the jail out on this host (QEMU ran unjailed)")
            return
        workers = {JAILED: jw, JAIL_OFF: env.vmd, FLOOR: env.bare}
        for i in range(s.warmup + s.start_rounds):
            took = {arm: await _start_kill(workers[arm], 1) * 1000 for arm in _order(i, list(workers))}
            if i >= s.warmup:
                for arm, ms in took.items():
                    r.add("jail", JAIL_START, arm, ms, "ms")
                r.add("jail", JAIL_COST, JAILED, took[JAILED] - took[JAIL_OFF], "ms")
            if i % 10 == 0:
                progress(f"jail start round {i + 1}/{s.warmup + s.start_rounds}")
        await _jail_bursts(env, workers)
    finally:
        await jw.close()


async def run_all(env: Env, only: set[str], guest_problem: str | None) -> None:
    """Run the selected benchmarks; one failing does not stop the others."""
    plan = [
        ("start", bench_start(env)),
        ("jail", bench_jail(env)),
        ("boot", bench_boot(env, guest_problem)),
        ("burst", bench_burst(env)),
        ("stats", bench_stats(env)),
        ("scale", bench_scale(env)),
        ("network", bench_network(env)),
        ("storage", bench_storage(env)),
        ("seed", bench_seed(env)),
        ("rbd", bench_rbd(env)),
        ("snapshots", bench_snapshots(env, guest_problem)),
    ]
    for name, coro in plan:
        if name not in only:
            coro.close()
            continue
        t0, load0 = time.monotonic(), os.getloadavg()[0]
        try:
            await coro
            env.results.note(f"{name}: {time.monotonic() - t0:.0f} s, 1-min load "
                             f"{load0:.1f} → {os.getloadavg()[0]:.1f}")
        except Exception as exc:
            env.results.note(f"{name} benchmark failed: {type(exc).__name__}: {exc}")
            progress(f"{name} failed: {exc}")
            # A failed op may leave VMs behind in a worker.
            for w in (env.vmd, env.bare):
                with contextlib.suppress(Exception):
                    await w.call("kill", timeout=120)
