"""``python -m bench``: run the suite, write bench/results/{results.md,results.json,results.png}.

Options: ``--smoke`` (one pass on tiny sizes), ``--only start,boot,...``,
``--no-libvirt``, ``--out DIR``, ``--start-rounds N``, ``--boot-rounds N``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench import libvirt
from bench.cases import SMOKE, Env, Sizes, progress, run_all
from bench.client import Worker
from bench.common import REPO, guest_ready, host_facts
from bench.results import Results, markdown

BENCHES = ("start", "jail", "boot", "burst", "stats", "scale", "network", "storage", "seed", "rbd",
           "snapshots")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="one pass on tiny sizes (seconds, not minutes)")
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma list of {', '.join(BENCHES)}")
    p.add_argument("--no-libvirt", action="store_true", help="leave libvirt out")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--start-rounds", type=int)
    p.add_argument("--boot-rounds", type=int)
    p.add_argument("--burst", type=int, nargs=2, metavar=("VMS", "ROUNDS"),
                   help="burst size and rounds (default 32 5)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--report-only", action="store_true", help="re-render OUT/results.json, run nothing")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the other benchmarks' results from OUT/results.json (re-run some only)",
    )
    return p.parse_args(argv)


def _kill_strays(root: Path) -> None:
    """Kill QEMU processes of this run that somehow outlived their arm (argv names our root)."""
    for p in psutil.process_iter(["name", "cmdline"]):
        argv = " ".join(p.info["cmdline"] or [])
        if (p.info["name"] or "").startswith("qemu-system") and str(root) in argv:
            with contextlib.suppress(psutil.Error):
                p.kill()


async def _watch_load(into: list[float], every: float = 10.0) -> None:
    """The 1-min load average every ``every`` seconds: the machine is shared, say how busy it was."""
    while True:
        into.append(os.getloadavg()[0])
        await asyncio.sleep(every)


def _load_summary(loads: list[float]) -> str:
    if not loads:
        return "not sampled"
    return (f"1-min avg every 10 s: median {statistics.median(loads):.1f}, min {min(loads):.1f}, "
            f"max {max(loads):.1f} ({len(loads)} samples)")


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = SMOKE if args.smoke else Sizes()
    if args.start_rounds:
        sizes = dataclasses.replace(sizes, start_rounds=args.start_rounds)
    if args.boot_rounds:
        sizes = dataclasses.replace(sizes, boot_rounds=args.boot_rounds)
    if args.burst:
        sizes = dataclasses.replace(sizes, burst_n=args.burst[0], burst_rounds=args.burst[1])
    return sizes


async def _libvirt(args: argparse.Namespace, root: Path, res: Results) -> libvirt.Libvirt | None:
    """A throwaway libvirtd for the peer arm, or ``None`` with the one-line reason recorded."""
    if not ({"start", "burst"} & _only(args)):
        return None
    why = "--no-libvirt given" if args.no_libvirt else libvirt.unavailable()
    if why is None:
        lv = libvirt.Libvirt(root / "lv")
        try:
            await lv.start()
            # Warm libvirtd's capability cache, as the method asks (first runs discarded).
            await lv.create("warm")
            await lv.destroy("warm")
            return lv
        except Exception as exc:
            why = f"libvirtd did not start here: {exc}"
            with contextlib.suppress(Exception):
                await lv.stop()
    res.skip("libvirt", why)
    return None


def _only(args: argparse.Namespace) -> set[str]:
    return {s.strip() for s in args.only.split(",") if s.strip()}


async def run(args: argparse.Namespace) -> Results:
    """Set up the arms, run the benchmarks, tear everything down."""
    sizes = _sizes(args)
    only = _only(args)
    if only - set(BENCHES):
        raise SystemExit(f"python -m bench: unknown benchmark(s) {', '.join(sorted(only - set(BENCHES)))}"
                         f" (known: {', '.join(BENCHES)})")
    res = Results()
    res.host = host_facts()
    # Short paths: unix socket paths must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="vb-", dir="/tmp"))
    lv = await _libvirt(args, root, res)
    vmd = await Worker.open("vmdriver", root / "v")
    bare = await Worker.open("bare", root / "b")
    try:
        env = Env(vmd=vmd, bare=bare, libvirt=lv, sizes=sizes, root=root, results=res)
        # Warm-up: imports, thread pools and page cache, in both arms.
        for w in (vmd, bare):
            await w.call("start", n=1)
            if w is vmd:
                res.argv = (await w.call("argv"))["argv"]
            await w.call("kill")
        loads: list[float] = []
        watch = asyncio.create_task(_watch_load(loads))
        try:
            await run_all(env, only, guest_ready())
        finally:
            watch.cancel()
        res.host["load_during_run"] = _load_summary(loads)
    finally:
        await vmd.close()
        await bare.close()
        if lv:
            await lv.stop()
        _kill_strays(root)
        shutil.rmtree(root, ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = _args(argv)
    t0 = time.monotonic()
    if args.report_only:
        res = Results()
        res.merge_from(args.out / "results.json", set())
        res.notes = [n.removeprefix("(earlier run) ") for n in res.notes]
        res.host = json.loads((args.out / "results.json").read_text())["host"]
    else:
        res = asyncio.run(run(args))
        res.note(f"suite wall time {time.monotonic() - t0:.0f} s"
                 + (" (smoke sizes: numbers are not meaningful)" if args.smoke else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge and not args.report_only and (args.out / "results.json").exists():
        ran = {s.strip() for s in args.only.split(",")}
        old_host = json.loads((args.out / "results.json").read_text())["host"]
        res.merge_from(args.out / "results.json", ran)
        # The kept cases ran at another commit and load: say which.
        res.host["earlier_run (cases not re-run)"] = {
            k: old_host[k] for k in ("vmdriver_commit", "load_at_start", "load_during_run")
            if k in old_host}
    title = "vmdriver benchmarks" + (" (smoke)" if args.smoke else "")
    if not args.no_plot:
        try:
            from bench.plot import plot

            plot(res, args.out / "results.png")
        except ImportError as exc:
            res.skip("plot", f"matplotlib not installed ({exc}); pip install matplotlib")
    (args.out / "results.md").write_text(markdown(res, title))
    res.write_json(args.out / "results.json")
    progress(f"results in {args.out}")
    sys.stdout.write(markdown(res, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
