"""The standalone benchmark modules as cases of ``python -m bench``: storage, seed, snapshots.

Each module still runs on its own (``python -m bench.storage`` ...); here its
samples become rows of the suite's report, with the targets of its issue. The
measuring functions block (files, qemu-img, their own event loop), so they run
in a thread; nothing else runs meanwhile, as for every case.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import TYPE_CHECKING, Any

from bench.results import Target, add_target, at_least, at_most

if TYPE_CHECKING:
    from bench.cases import Env

CHAIN_10G = "chained disk on a 10 GiB image, base exists"
CHAIN_1G = "chained disk on a 1 GiB image, base exists"
CHAIN_FLAT = "chained disk: 10 GiB image / 1 GiB image (per round)"
CLONE_SPEED = "full clone: speed / cp --reflink=auto's speed (per round)"
SEED_TARGET_MS = 20.0
SNAP_RATIO = "request → HTTP: cold boot / from snapshot (medians)"
#: Flat in size: 10x the image may cost at most this much more (linear would be 10x).
FLAT_LIMIT = 1.5

add_target("storage", CHAIN_10G, Target("≤ 50 ms", at_most(50.0)))
add_target("storage", CHAIN_FLAT, Target(f"≤ {FLAT_LIMIT}x (flat in the image's size)",
                                         at_most(FLAT_LIMIT)))
add_target("storage", CLONE_SPEED, Target("≥ 0.8x", at_least(0.8)))
for _fmt in ("iso", "fat"):
    add_target("seed", f"build a NoCloud seed ({_fmt})", Target("≤ 20 ms", at_most(SEED_TARGET_MS)))
add_target("snapshots", SNAP_RATIO, Target("≥ 10x", at_least(10.0)))


async def bench_storage(env: Env) -> None:
    """storage: chained disk creation (1 vs 10 GiB image), full clone vs ``cp --reflink=auto``."""
    from bench.cases import progress
    from bench.storage import MIB, chained_create, full_clone

    s, r = env.sizes, env.results
    progress(f"storage: {s.storage_rounds} chained disks per image size, "
             f"{s.clone_rounds} clones of {s.clone_mib} MiB")
    chain = await asyncio.to_thread(chained_create, s.storage_rounds, env.root,
                                    s.storage_data_mib * MIB)
    small, large = chain["samples_ms"]["1GiB"], chain["samples_ms"]["10GiB"]
    for v in small:
        r.add("storage", CHAIN_1G, "vmdriver", v, "ms")
    for v in large:
        r.add("storage", CHAIN_10G, "vmdriver", v, "ms")
    for a, b in zip(small, large, strict=True):
        r.add("storage", CHAIN_FLAT, "vmdriver", b / a, "x")
    for size in ("1GiB", "10GiB"):
        r.add("storage", f"first chained disk of a {size[:-3]} GiB image (hash + base made)",
              "vmdriver", chain[f"first_ms_{size}"], "ms")
    clone = await asyncio.to_thread(full_clone, s.clone_rounds, s.clone_mib * MIB, env.root)
    label = f"full clone of a {s.clone_mib} MiB volume"
    ours, cp = clone["samples_ms"]["pool_clone"], clone["samples_ms"]["cp"]
    for v in ours:
        r.add("storage", label, "vmdriver", v, "ms")
    for v in cp:
        r.add("storage", label, "cp --reflink=auto", v, "ms")
    for o, c in zip(ours, cp, strict=True):
        r.add("storage", CLONE_SPEED, "vmdriver", c / o, "x")


async def bench_seed(env: Env) -> None:
    """seed: building a NoCloud seed for a realistic virt task, ISO and FAT."""
    from bench.cases import progress
    from bench.seed import run_seed_bench

    progress(f"seed: {env.sizes.seed_rounds} seeds per format")
    for fmt in ("iso", "fat"):
        out = await asyncio.to_thread(run_seed_bench, env.sizes.seed_rounds, fmt)
        samples = out["samples_ms"]
        assert isinstance(samples, list)
        for v in samples:
            env.results.add("seed", f"build a NoCloud seed ({fmt})", "vmdriver", v, "ms")


def _snapshot_rows(env: Env, out: dict[str, Any], clones: int) -> None:
    """The rows of one bench.snapshots run."""
    r = env.results
    for arm, key in (("cold boot", "cold_boot_s"), ("from snapshot", "from_snapshot_s")):
        for v in out[key]:
            r.add("snapshots", "request → guest serves HTTP", arm, v, "s")
    r.add("snapshots", SNAP_RATIO, "vmdriver",
          statistics.median(out["cold_boot_s"]) / statistics.median(out["from_snapshot_s"]), "x")
    r.add("snapshots", f"{clones} clones of one snapshot at once → all serve HTTP", "vmdriver",
          out[f"clones_{clones}_at_once_s"], "s")
    ram = f"{out['state_mib']:.0f} MiB state of {out['memory_mib']} MiB RAM"
    r.add("snapshots", f"save throughput ({ram})", "vmdriver", out["save_mib_s"], "MiB/s")
    r.add("snapshots", "save: guest paused", "vmdriver", out["snapshot_pause_ms"] or 0, "ms")
    r.add("snapshots", f"restore throughput ({ram})", "vmdriver", out["restore_mib_s"], "MiB/s")
    mig = out["migration"]
    r.add("snapshots", "live migration (unix socket): downtime", "vmdriver", mig["downtime_ms"], "ms")
    r.add("snapshots", "live migration (unix socket): total", "vmdriver", mig["total_s"], "s")


async def bench_snapshots(env: Env, guest_problem: str | None) -> None:
    """snapshots: request → HTTP from a snapshot vs a cold boot, clones, save/restore, migration."""
    from bench.cases import progress

    if guest_problem:
        env.results.skip("snapshots", guest_problem)
        return
    from bench import snapshots

    s = env.sizes
    progress(f"snapshots: {s.snapshot_rounds} cold boots and clones, {s.snapshot_clones} at once, "
             "a migration")
    # bench.snapshots runs its own Supervisor (default host config) on this loop.
    out = await snapshots.run(s.snapshot_rounds, s.snapshot_clones)
    _snapshot_rows(env, out, s.snapshot_clones)
