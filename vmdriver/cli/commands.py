"""The CLI's commands: thin layers over the job planner and the supervisor."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmdriver.artifacts import (
    ArtifactCache,
    default_cache_dir,
    fetch_artifacts_async,
    progress_display,
)
from vmdriver.cli.main import err_console, print_json
from vmdriver.errors import InputError, VmdriverError
from vmdriver.host.config import HostConfig
from vmdriver.host.fingerprint import fingerprint
from vmdriver.jobfile.model import load_job
from vmdriver.jobfile.plan import TaskPlan, plan_job
from vmdriver.qemu.argv import display, render_argv
from vmdriver.runtime import cgroup
from vmdriver.runtime.console import follow
from vmdriver.runtime.prepare import Prepared, prepare
from vmdriver.runtime.record import VMRecord
from vmdriver.runtime.supervisor import Supervisor
from vmdriver.runtime.vm import VM


def _status(msg: str) -> None:
    err_console.print(f"[bold cyan]vmdriver[/]: {msg}", highlight=False)


def _forwards(plan: TaskPlan) -> str:
    net = plan.spec.network
    if not net or not net.forwards:
        return ""
    return ", ".join(f"{f.label} host:{f.host_port} → guest:{f.guest_port}" for f in net.forwards)


async def _prepare_all(plans: list[TaskPlan], host: HostConfig, job_dir: Path) -> list[Prepared]:
    """Artifacts and checks for every task before any VM starts."""
    # Task dirs hold sockets and images: private to the owner from the top (an
    # existing dir, e.g. a --state-dir the user made, keeps its mode).
    for d in (host.state_dir, host.state_dir / "allocs"):
        if not d.exists():
            d.mkdir(parents=True, mode=0o700)
    out = []
    cache = ArtifactCache(default_cache_dir(host.state_dir), max_bytes=host.artifact_cache_max_bytes)
    for plan in plans:
        plan.task_dir.create()
        if plan.artifacts:
            with progress_display(err_console) as on_progress:
                await fetch_artifacts_async(plan.artifacts, plan.task_dir.path, job_dir,
                                            cache=cache, progress=on_progress)
        out.append(await asyncio.to_thread(prepare, plan.spec, plan.task_dir, host,
                                           where=plan.task.where))
    return out


def _cleanup(plans: list[TaskPlan]) -> None:
    """Remove task dirs but keep the logs of the allocation."""
    for plan in plans:
        shutil.rmtree(plan.task_dir.path, ignore_errors=True)


async def cmd_run(args: argparse.Namespace, host: HostConfig) -> int:
    """`vmdriver run JOB.hcl`."""
    job = load_job(args.job)
    plans = plan_job(job, host.state_dir)
    ready_re = re.compile(args.ready) if args.ready else None
    try:
        prepared = await _prepare_all(plans, host, args.job.resolve().parent)
    except BaseException:
        _cleanup(plans)
        for plan in plans:
            shutil.rmtree(plan.task_dir.alloc_dir, ignore_errors=True)
        raise
    sup = Supervisor(host)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    presses = 0
    killers: set[asyncio.Task[object]] = set()

    def on_signal() -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            _status("stopping (again to kill)")
            stop_requested.set()
        else:
            for vm in sup.vms():
                task: asyncio.Task[object] = loop.create_task(vm.kill())
                killers.add(task)
                task.add_done_callback(killers.discard)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    consoles: list[asyncio.Task[None]] = []
    started: list[tuple[TaskPlan, VM]] = []
    placements: list[cgroup.Placement] = []
    try:
        t0 = time.monotonic()
        for plan, prep in zip(plans, prepared, strict=True):
            vm = await sup.start(plan.vm_id, plan.spec, plan.task_dir, env=plan.env,
                                 prepared=prep, on_spawn=_confiner(plan, prep, placements))
            started.append((plan, vm))
            fw = _forwards(plan)
            _status(f"task {plan.task.name!r} running (pid {vm.pid}, {prep.ctx.accelerator}, "
                    f"{time.monotonic() - t0:.2f}s){'; ' + fw if fw else ''}")
            consoles.append(asyncio.create_task(
                _console(plan, vm, len(plans) > 1, args.quiet, ready_re),
                name=f"console of {plan.task.name}"))
        waits: asyncio.Future[list[object]] = asyncio.gather(*(vm.wait() for _, vm in started))
        stopper: asyncio.Future[Any] = asyncio.create_task(stop_requested.wait())
        await asyncio.wait([waits, stopper], return_when=asyncio.FIRST_COMPLETED)
        if stop_requested.is_set():
            await sup.stop_all()
        await waits
        stopper.cancel()
    finally:
        for task in consoles:
            task.cancel()
        if not all(vm.result for _, vm in started):
            await asyncio.gather(*(vm.kill() for _, vm in started), return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        for placement in placements:
            cgroup.remove(placement.created)
        _cleanup(plans)
    ok = True
    for plan, vm in started:
        res = vm.result
        assert res is not None
        ok = ok and res.successful
        style = "green" if res.successful else "red"
        err_console.print(f"[bold cyan]vmdriver[/]: task {plan.task.name!r}: [{style}]"
                          f"{res.describe()}[/]", highlight=False)
    _status(f"logs in {plans[0].task_dir.shared / 'logs'}")
    return 0 if ok else 1


def _confiner(plan: TaskPlan, prep: Prepared,
              placements: list[cgroup.Placement]) -> Callable[[int], None] | None:
    """Confine QEMU the way a Nomad client would (memory with headroom, CPU weight).

    Only as root: elsewhere cgroups are not ours to write, and the VM runs unconfined.
    """
    if os.geteuid() != 0:
        return None
    limits = cgroup.limits_for(plan.spec.resources, prep.ctx.accelerator)
    scope = f"{plan.alloc_id[:8]}.{plan.task.name}"

    def confine(pid: int) -> None:
        placements.append(cgroup.apply(pid, limits, scope, parent="vmdriver"))

    return confine


async def _console(plan: TaskPlan, vm: VM, prefix: bool, quiet: bool,
                   ready: re.Pattern[str] | None) -> None:
    """Echo a VM's serial console and announce readiness."""
    tag = f"[{plan.task.name}] " if prefix else ""
    async for line in follow(vm.stdout):
        if not quiet:
            sys.stdout.write(f"{tag}{line}\n")
            sys.stdout.flush()
        if ready and ready.search(line):
            _status(f"task {plan.task.name!r} ready")
            ready = None


def cmd_argv(args: argparse.Namespace, host: HostConfig) -> int:
    """`vmdriver argv JOB.hcl`: the argv each task would run with."""
    job = load_job(args.job)
    plans = plan_job(job, host.state_dir, check_ports=False)
    out = []
    for plan in plans:
        prep = prepare(plan.spec, plan.task_dir, host, where=plan.task.where, preview=True)
        out.append((plan.task.name, render_argv(prep.spec, prep.ctx)))
    if args.json:
        print_json({name: list(argv) for name, argv in out})
    else:
        for name, argv in out:
            if len(out) > 1:
                sys.stdout.write(f"# task {name}\n")
            sys.stdout.write(display(argv) + "\n")
    return 0


def cmd_fingerprint(args: argparse.Namespace, host: HostConfig) -> int:
    """`vmdriver fingerprint`."""
    if args.refresh:
        with contextlib.suppress(FileNotFoundError):
            (host.state_dir / "kvm-probe.json").unlink()
    fp = fingerprint(host.state_dir, host.emulators_allowlist)
    data = {
        "healthy": fp.healthy,
        "description": fp.description,
        "attributes": fp.attributes,
        "emulators": [{"arch": e.arch, "path": str(e.path), "version": e.version}
                      for e in fp.emulators],
        "kvm": {"usable": fp.kvm.usable, "reason": fp.kvm.reason, "kernel": fp.kvm.kernel,
                "probe_seconds": round(fp.kvm.seconds, 3)},
    }
    if args.json:
        print_json(data)
        return 0
    for e in fp.emulators:
        sys.stdout.write(f"emulator  {e.arch:<12} {e.version or '?':<10} {e.path}\n")
    if not fp.emulators:
        sys.stdout.write("emulator  none found on PATH\n")
    sys.stdout.write(f"kvm       {'usable' if fp.kvm.usable else 'not usable'}: {fp.kvm.reason}\n")
    for k, v in sorted(fp.attributes.items()):
        sys.stdout.write(f"attribute {k} = {str(v).lower() if isinstance(v, bool) else v}\n")
    return 0 if fp.healthy else 1


def _records(host: HostConfig) -> list[VMRecord]:
    out = []
    for path in sorted((host.state_dir / "allocs").glob("*/*/vmdriver.json")):
        with contextlib.suppress(OSError, ValueError):
            out.append(VMRecord.model_validate_json(path.read_text()))
    return out


def cmd_ps(args: argparse.Namespace, host: HostConfig) -> int:
    """`vmdriver ps`."""
    from vmdriver.runtime.process import QemuProcess

    rows = []
    for rec in _records(host):
        proc = QemuProcess.attach(rec.pid, rec.pid_start_time)
        if proc:
            proc.close()
        rows.append({"id": rec.id, "task": rec.task, "pid": rec.pid,
                     "running": proc is not None, "started_at": rec.started_at})
    if args.json:
        print_json(rows)
    else:
        for r in rows:
            sys.stdout.write(f"{r['id']}  {r['task']}  pid {r['pid']}  "
                             f"{'running' if r['running'] else 'gone'}\n")
    return 0


async def cmd_stop(args: argparse.Namespace, host: HostConfig) -> int:
    """`vmdriver stop TARGET`: re-attach to matching VMs and stop them."""
    if not args.target and not args.all:
        raise InputError("name a VM (alloc id prefix or task name) or pass --all",
                         where="vmdriver stop")
    recs = [r for r in _records(host)
            if args.all or r.id.startswith(args.target) or r.task == args.target]
    if not recs:
        raise InputError("no running VM matches", where="vmdriver stop", value=args.target)
    sup = Supervisor(host)
    failed = 0
    for rec in recs:
        try:
            vm = await sup.recover(rec)
            res = await vm.stop(args.timeout)
            _status(f"task {rec.task!r} ({rec.id}): {res.describe()}")
        except VmdriverError as exc:
            failed += 1
            err_console.print(f"vmdriver: error: {rec.id}: {exc}", markup=False)
    return 1 if failed else 0
