"""`vmdriver snapshot`, `vmdriver migrate`, `vmdriver receive`: memory state of running VMs.

::

    vmdriver snapshot TASK NAME [--stop]   save a running VM into the store (it runs on)
    vmdriver snapshot ls [--json]          the store
    vmdriver snapshot rm NAME...           delete (refused while a VM's disks stand on it)
    vmdriver migrate TASK --to ADDR        move a running VM to a `vmdriver receive`
    vmdriver receive --listen ADDR         take one VM and run it in the foreground

Tasks are found as `vmdriver stop` finds them: alloc id prefix or task name.
See docs/snapshots.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from vmdriver.errors import InputError
from vmdriver.host.config import HostConfig

Handler = Callable[[argparse.Namespace, HostConfig], Any]


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the subcommands (handled by :data:`HANDLERS`)."""
    snap = sub.add_parser("snapshot", help="save a running VM's memory and disks; ls; rm")
    snap.add_argument("words", nargs="+", metavar="TASK NAME | ls | rm NAME",
                      help="what to snapshot and its name, or ls, or rm and names")
    snap.add_argument("--stop", action="store_true", help="end the VM once it is saved")
    snap.add_argument("--json", action="store_true", help="ls: print JSON")
    common(snap)
    mig = sub.add_parser("migrate", help="move a running VM to another vmdriver (receive)")
    mig.add_argument("target", metavar="TASK", help="alloc id prefix or task name")
    mig.add_argument("--to", required=True, metavar="ADDR",
                     help="unix:/path, /path or host:port of a `vmdriver receive`")
    common(mig)
    rcv = sub.add_parser("receive", help="take one migrating VM and run it until it ends")
    rcv.add_argument("--listen", required=True, metavar="ADDR",
                     help="unix:/path, /path or host:port to listen on")
    common(rcv)


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def cmd_snapshot(args: argparse.Namespace, host: HostConfig) -> int:
    """`vmdriver snapshot TASK NAME | ls | rm NAME...`."""
    from vmdriver.runtime.snapstore import SnapshotStore, check_snapshot_name

    words: list[str] = args.words
    store = SnapshotStore(host.state_dir)
    if words == ["ls"]:
        return _list(store, args.json)
    if words[0] == "rm" and len(words) > 1:
        for name in words[1:]:
            store.remove(name)
            _out(f"removed {name}")
        return 0
    if len(words) != 2:
        raise InputError("expected TASK NAME, ls, or rm NAME...", where="vmdriver snapshot",
                         value=" ".join(words))
    from vmdriver.cli.guest import find_running
    from vmdriver.runtime.snapshots import snapshot_recorded

    target, name = words
    check_snapshot_name(name)
    rec = find_running(host, target, "vmdriver snapshot")
    meta = await snapshot_recorded(rec, host, name, stop=args.stop)
    size = (meta.state_size or 0) / (1 << 20)
    _out(f"snapshot {name}: {meta.memory_mib} MiB guest RAM, state {size:.1f} MiB saved in "
         f"{meta.save_seconds:.2f}s ({size / max(meta.save_seconds, 1e-3):.0f} MiB/s), "
         f"guest paused {meta.downtime_ms} ms, {len(meta.disks)} disk(s) frozen")
    return 0


def _list(store: Any, as_json: bool) -> int:
    rows = [{"name": m.name, "created_at": m.created_at, "source": m.source,
             "qemu": m.qemu_version, "machine": m.machine, "memory_mib": m.memory_mib,
             "state_bytes": m.state_size, "disks": [d.drive_id for d in m.disks],
             "in_use": used, "complete": m.has_state} for m, used in store.listing()]
    if as_json:
        from vmdriver.cli.main import print_json

        print_json(rows)
        return 0
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"]))
        state = f"{(r['state_bytes'] or 0) / (1 << 20):.1f} MiB" if r["complete"] else "no state"
        _out(f"{r['name']:<20} {when}  {r['machine']:<16} QEMU {r['qemu']:<8} "
             f"{r['memory_mib']} MiB RAM, {state}, disks {','.join(r['disks']) or '-'}"
             f"{'  (in use)' if r['in_use'] else ''}")
    return 0


async def cmd_migrate(args: argparse.Namespace, host: HostConfig) -> int:
    """`vmdriver migrate TASK --to ADDR`."""
    from vmdriver.cli.guest import find_running
    from vmdriver.runtime.livemigrate import migrate_recorded

    rec = find_running(host, args.target, "vmdriver migrate")
    report = await migrate_recorded(rec, host, args.to)
    dest = report.destination
    _out(f"migrated {rec.task} to {args.to} as {dest.get('id')}: total {report.total_s:.2f}s, "
         f"downtime {report.downtime_ms} ms, {report.ram_mib:.1f} MiB RAM sent"
         + (f"; {', '.join(dest.get('forwards', []))}" if dest.get("forwards") else ""))
    return 0


async def cmd_receive(args: argparse.Namespace, host: HostConfig) -> int:
    """`vmdriver receive --listen ADDR`: one incoming VM, run in the foreground."""
    from vmdriver.runtime import livemigrate
    from vmdriver.runtime.runloop import RunHooks, run_vms
    from vmdriver.runtime.supervisor import Supervisor

    listener = livemigrate.listen(args.listen)
    _out(f"listening on {args.listen}")
    conn = await asyncio.to_thread(livemigrate.accept_one, listener)
    try:
        header = await asyncio.to_thread(livemigrate.receive_message, conn, 30.0)
        req = livemigrate.incoming_request(header, conn, host, uuid.uuid4().hex[:8])
        req.dirs.create()

        def started(_req: Any, info: Any, seconds: float) -> None:
            livemigrate.send_message(conn, {"status": "running", "id": req.vm_id,
                                     "forwards": livemigrate.forwards_of(req.spec)})
            _out(f"running {req.vm_id} (pid {info.pid}) after {seconds:.2f}s; "
                 + ", ".join(livemigrate.forwards_of(req.spec)))

        outcome = await run_vms(Supervisor(host), [req], RunHooks(started=started))
    except BaseException as exc:
        from contextlib import suppress

        with suppress(OSError):
            livemigrate.send_message(conn, {"status": "failed", "error": str(exc) or type(exc).__name__})
        raise
    finally:
        conn.close()
    for _, res in outcome.results:
        _out(f"{req.vm_id}: {res.describe()}")
    return 0 if outcome.successful else 1


#: The subcommands' handlers by name, for `vmdriver.cli.main`.
HANDLERS: dict[str, Handler] = {"snapshot": cmd_snapshot, "migrate": cmd_migrate,
                                "receive": cmd_receive}
