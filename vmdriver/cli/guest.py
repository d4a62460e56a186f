"""`vmdriver exec` and `vmdriver signal`, and what `vmdriver run` adds for guests and metrics.

`exec` and `signal` find the VM in the state dir's records (as `vmdriver stop`
does) and talk to its guest agent's socket directly: they need neither QMP nor
the supervisor that runs the VM, so they work alongside `vmdriver run` and the
plugin alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vmdriver.cli.main import err_console
from vmdriver.errors import InputError, MonitorError, StateError
from vmdriver.host.config import HostConfig
from vmdriver.qemu.agent import GuestAgent
from vmdriver.qemu.monitor import Monitor
from vmdriver.runtime import guestexec
from vmdriver.runtime.guestsignal import signal_guest
from vmdriver.runtime.guestwatch import GuestWatch
from vmdriver.runtime.record import VMRecord
from vmdriver.runtime.runloop import RunOutcome
from vmdriver.runtime.supervisor import Supervisor, VMInfo
from vmdriver.spec import VMSpec

if TYPE_CHECKING:
    from vmdriver.runtime.metrics import VmMetrics


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                common: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `exec` and `signal` subcommands."""
    ex = sub.add_parser("exec", help="run a command in a VM's guest through its guest agent")
    ex.add_argument("target", metavar="TASK", help="alloc id prefix or task name")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    ex.add_argument("--timeout", type=float, help="kill the command after this many seconds "
                    f"(exit status {guestexec.TIMEOUT_EXIT_CODE})")
    ex.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment of the command (replaces the agent's; PATH is kept)")
    ex.add_argument("--no-stdin", action="store_true", help="do not pass stdin to the command")
    common(ex)
    sg = sub.add_parser("signal", help="send a signal to a VM's guest (SIGTERM/SIGINT: shut down)")
    sg.add_argument("target", metavar="TASK", help="alloc id prefix or task name")
    sg.add_argument("signal", metavar="SIG", help="e.g. SIGHUP, HUP or 1")
    sg.add_argument("--process", default="", metavar="NAME",
                    help="only the guest processes with this name")
    common(sg)


def find_running(host: HostConfig, target: str, where: str) -> VMRecord:
    """The one running VM whose id starts with ``target`` or whose task is ``target``."""
    recs = [r for r, running in Supervisor.known(host.state_dir)
            if running and (r.id.startswith(target) or r.task == target)]
    if not recs:
        raise InputError("no running VM matches", where=where, value=target)
    if len(recs) > 1:
        raise InputError("more than one running VM matches; give an alloc id prefix",
                         where=where, value=target, allowed=[r.id for r in recs])
    return recs[0]


def agent_of(rec: VMRecord) -> GuestAgent:
    """The VM's agent; a clear error if it was started without one."""
    if not VMSpec.model_validate(rec.spec).guest_agent:
        raise StateError(f"of task {rec.task!r}", "without a guest agent",
                         "started with guest_agent = true (exec and signals go through it)")
    return GuestAgent(Path(rec.qga_socket))


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InputError("not NAME=VALUE", where="--env", value=item)
        env[name] = value
    return env


async def _stdin() -> AsyncIterator[bytes]:
    """Our stdin, read by a thread (works for terminals, pipes and files alike)."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[bytes] = asyncio.Queue()

    def read() -> None:
        while True:
            try:
                data = os.read(sys.stdin.fileno(), 65536)
            except (OSError, ValueError):
                data = b""
            loop.call_soon_threadsafe(inbox.put_nowait, data)
            if not data:
                return

    threading.Thread(target=read, daemon=True, name="stdin").start()
    while data := await inbox.get():
        yield data


def _write(stream: str, data: bytes) -> None:
    out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    out.write(data)
    out.flush()


async def cmd_exec(args: argparse.Namespace, host: HostConfig) -> int:
    """`vmdriver exec TASK -- CMD ARGS...`: the command's exit status is ours."""
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise InputError("no command given", where="vmdriver exec",
                         allowed="vmdriver exec TASK -- CMD ARGS...")
    rec = find_running(host, args.target, "vmdriver exec")
    agent = agent_of(rec)
    await guestexec.require_agent(agent, f"exec in task {rec.task!r}")
    stdin = None if args.no_stdin else _stdin()
    result = await guestexec.run(agent, argv, _write, stdin=stdin, env=_parse_env(args.env),
                                 timeout=args.timeout)
    if result.timed_out:
        err_console.print(f"vmdriver: the command ran longer than {args.timeout:g}s and was killed",
                          markup=False)
    return result.exit_code


async def cmd_signal(args: argparse.Namespace, host: HostConfig) -> int:
    """`vmdriver signal TASK SIG`."""
    rec = find_running(host, args.target, "vmdriver signal")

    async def powerdown() -> None:
        # The ACPI button when the agent cannot shut down: QMP's re-attach socket.
        mon = Monitor(rec.task)
        try:
            await mon.connect(Path(rec.qmp_socket), timeout=5)
            await mon.execute("system_powerdown")
        finally:
            await mon.disconnect()

    outcome = await signal_guest(agent_of(rec), args.signal, process=args.process,
                                 powerdown=powerdown)
    err_console.print(f"vmdriver: task {rec.task!r}: {outcome.describe()}", markup=False)
    return 0


class RunExtras:
    """What `vmdriver run` adds per VM: guest event lines and, if asked, a metrics endpoint."""

    def __init__(self, sup: Supervisor, status: Callable[[str], None],
                 metrics_addr: str | None) -> None:
        self.sup, self.status = sup, status
        self.names: dict[str, str] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.metrics: VmMetrics | None = None
        if metrics_addr:
            from vmdriver.runtime.metrics import VmMetrics  # prometheus-client only when asked

            self.metrics = VmMetrics()
            host, port = self.metrics.serve(metrics_addr)
            status(f"metrics on http://{host}:{port}/metrics")
            self.tasks.append(asyncio.create_task(
                self.metrics.poll(sup, lambda i: self.names.get(i, i)), name="metrics poller"))

    def started(self, vm_id: str, name: str, info: VMInfo, seconds: float) -> None:
        """A VM runs: watch its guest come up; note the start time."""
        self.names[vm_id] = name
        if self.metrics is not None:
            self.metrics.started(vm_id, name, seconds)

        def emit(kind: str, message: str, annotations: dict[str, str]) -> None:
            self.status(f"task {name!r}: {message}")
            if kind == "agent" and self.metrics is not None:
                self.metrics.booted(vm_id, float(annotations["seconds"]))

        with contextlib.suppress(MonitorError, StateError):
            watch = GuestWatch(self.sup, vm_id, emit)
            self.tasks.append(asyncio.create_task(watch.run(), name=f"guest of {name}"))

    def finish(self, outcome: RunOutcome | None) -> None:
        """Count how the VMs ended; stop watching and serving."""
        for _req, res in outcome.results if outcome else ():
            if self.metrics is not None:
                self.metrics.stopped(res.kind)
        for task in self.tasks:
            task.cancel()
        if self.metrics is not None:
            self.metrics.close()
