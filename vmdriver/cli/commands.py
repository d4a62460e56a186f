"""The CLI's commands: thin layers over the job planner and the supervisor."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import sys
from pathlib import Path

from vmdriver.artifacts import (
    ArtifactCache,
    default_cache_dir,
    fetch_artifacts_async,
    progress_display,
)
from vmdriver.cli.guest import RunExtras
from vmdriver.cli.main import err_console, print_json
from vmdriver.errors import InputError, VmdriverError
from vmdriver.host.config import HostConfig
from vmdriver.host.fingerprint import fingerprint
from vmdriver.jobfile.model import load_job
from vmdriver.jobfile.plan import TaskPlan, plan_job, provision, release
from vmdriver.qemu.argv import display
from vmdriver.runtime.console import follow
from vmdriver.runtime.netconfig import saved_addresses
from vmdriver.runtime.request import LaunchRequest
from vmdriver.runtime.runloop import RunHooks, run_vms
from vmdriver.runtime.supervisor import Supervisor, VMInfo
from vmdriver.spec import PortForward, UserNic


def _status(msg: str) -> None:
    err_console.print(f"[bold cyan]vmdriver[/]: {msg}", highlight=False)


def _forwards(plan: TaskPlan) -> str:
    fwds: list[PortForward] = [f for n in plan.spec.nics if isinstance(n, UserNic) for f in n.forwards]
    return ", ".join(f"{f.label} host:{f.host_port} → guest:{f.guest_port}" for f in fwds)


async def _fetch_artifacts(plans: list[TaskPlan], host: HostConfig, job_dir: Path) -> None:
    """Every task's artifacts, before any VM starts."""
    # Task dirs hold images: private to the owner from the top (an existing dir,
    # e.g. a --state-dir the user made, keeps its mode).
    for d in (host.state_dir, host.state_dir / "allocs"):
        if not d.exists():
            d.mkdir(parents=True, mode=0o700)
    cache = ArtifactCache(default_cache_dir(host.state_dir), max_bytes=host.artifact_cache_max_bytes)
    for plan in plans:
        plan.task_dir.create()
        if plan.artifacts:
            with progress_display(err_console) as on_progress:
                await fetch_artifacts_async(plan.artifacts, plan.task_dir.path, job_dir,
                                            cache=cache, progress=on_progress, host=host)


def _remove_allocs(plans: list[TaskPlan]) -> None:
    """After a failed start: task dirs go; logs stay where QEMU wrote any."""
    for plan in plans:
        shutil.rmtree(plan.task_dir.path, ignore_errors=True)
        logs = plan.task_dir.shared / "logs"
        if not any(logs.glob("*")) if logs.is_dir() else True:
            shutil.rmtree(plan.task_dir.alloc_dir, ignore_errors=True)


def _release(plans: list[TaskPlan], host: HostConfig) -> None:
    """Remove what the tasks' dialects made (virt volumes); never hides the run's own error."""
    for plan in plans:
        try:
            release(plan, host)
        except VmdriverError as exc:
            err_console.print(f"vmdriver: error: {exc}", markup=False)


async def cmd_run(args: argparse.Namespace, host: HostConfig) -> int:
    """`vmdriver run JOB.hcl`: the job's VMs in the foreground, until they end."""
    plans = plan_job(load_job(args.job), host.state_dir)
    try:
        await _fetch_artifacts(plans, host, args.job.resolve().parent)
        plans = [await asyncio.to_thread(provision, p, host) for p in plans]
    except BaseException:
        _release(plans, host)
        _remove_allocs(plans)
        raise
    try:
        code = await _run(args, host, plans)
    except BaseException:
        _release(plans, host)  # a failed start leaves no volume behind, kept or not
        raise
    if not args.keep_volumes:
        _release(plans, host)
    return code


async def _run(args: argparse.Namespace, host: HostConfig, plans: list[TaskPlan]) -> int:
    by_id = {p.vm_id: p for p in plans}
    sup = Supervisor(host)
    ready_re = re.compile(args.ready) if args.ready else None
    consoles: list[asyncio.Task[None]] = []
    extras = RunExtras(sup, _status, getattr(args, "metrics", None))

    def started(req: LaunchRequest, info: VMInfo, seconds: float) -> None:
        plan = by_id[req.vm_id]
        fw = _forwards(plan)
        _status(f"task {plan.task.name!r} running (pid {info.pid}, {info.accelerator}, "
                f"{seconds:.2f}s){'; ' + fw if fw else ''}")
        consoles.append(asyncio.create_task(
            _console(plan, info.stdout, len(plans) > 1, args.quiet, ready_re),
            name=f"console of {plan.task.name}"))
        extras.started(req.vm_id, plan.task.name, info, seconds)

    hooks = RunHooks(started=started, stopping=lambda: _status("stopping (again to kill)"))
    outcome = None
    try:
        outcome = await run_vms(sup, [p.request(host.state_dir) for p in plans], hooks)
    except BaseException:
        _remove_allocs(plans)
        raise
    finally:
        for task in consoles:
            task.cancel()
        extras.finish(outcome)
    for req, res in outcome.results:
        style = "green" if res.successful else "red"
        err_console.print(f"[bold cyan]vmdriver[/]: task {by_id[req.vm_id].task.name!r}: "
                          f"[{style}]{res.describe()}[/]", highlight=False)
    _status(f"logs in {plans[0].task_dir.shared / 'logs'}")
    return 0 if outcome.successful else 1


async def _console(plan: TaskPlan, stdout: Path, prefix: bool, quiet: bool,
                   ready: re.Pattern[str] | None) -> None:
    """Echo a VM's serial console and announce readiness."""
    tag = f"[{plan.task.name}] " if prefix else ""
    async for line in follow(stdout):
        if not quiet:
            sys.stdout.write(f"{tag}{line}\n")
            sys.stdout.flush()
        if ready and ready.search(line):
            _status(f"task {plan.task.name!r} ready")
            ready = None


def cmd_argv(args: argparse.Namespace, host: HostConfig) -> int:
    """`vmdriver argv JOB.hcl`: the argv each task would run with."""
    job = load_job(args.job)
    plans = [provision(p, host, preview=True)
             for p in plan_job(job, host.state_dir, check_ports=False)]
    sup = Supervisor(host)
    out = [(plan.task.name, sup.argv(plan.request(host.state_dir))) for plan in plans]
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


def cmd_ps(args: argparse.Namespace, host: HostConfig) -> int:
    """`vmdriver ps`."""
    known = Supervisor.known(host.state_dir)
    # Written by the supervisor's discovery (tap and macvtap NICs).
    ips = {rec.id: list(saved_addresses(Path(rec.runtime_dir))) for rec, _ in known}
    rows = [{"id": rec.id, "task": rec.task, "pid": rec.pid, "running": running,
             "started_at": rec.started_at, "addresses": ips[rec.id]} for rec, running in known]
    if args.json:
        print_json(rows)
    else:
        for rec, running in known:
            sys.stdout.write(f"{rec.id}  {rec.task}  pid {rec.pid}  "
                             f"{'running' if running else 'gone'}  ip {','.join(ips[rec.id]) or '-'}\n")
    return 0


async def cmd_stop(args: argparse.Namespace, host: HostConfig) -> int:
    """`vmdriver stop TARGET`: re-attach to matching VMs and stop them."""
    if not args.target and not args.all:
        raise InputError("name a VM (alloc id prefix or task name) or pass --all",
                         where="vmdriver stop")
    recs = [r for r, _ in Supervisor.known(host.state_dir)
            if args.all or r.id.startswith(args.target) or r.task == args.target]
    if not recs:
        raise InputError("no running VM matches", where="vmdriver stop", value=args.target)
    sup = Supervisor(host)
    failed = 0
    for rec in recs:
        try:
            await sup.recover(rec)
            res = await sup.stop(rec.id, args.timeout)
            _status(f"task {rec.task!r} ({rec.id}): {res.describe()}")
        except VmdriverError as exc:
            failed += 1
            err_console.print(f"vmdriver: error: {rec.id}: {exc}", markup=False)
    return 1 if failed else 0
