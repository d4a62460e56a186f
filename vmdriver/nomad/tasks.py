"""The plugin's tasks: Nomad's task ids mapped onto the shared supervisor.

Everything here runs on the plugin's event loop. A task's QEMU is launched,
stopped and measured only through :class:`~vmdriver.runtime.supervisor.Supervisor`
(the same code `vmdriver run` uses); this layer adds Nomad's ids, the task's
cgroups, task events and the opaque ``driver_state`` that re-attaching needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import queue
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmdriver.errors import InputError, LaunchError, StateError, TaskNotFound
from vmdriver.nomad.taskconfig import StartPlan
from vmdriver.qemu.agent import GuestAgent
from vmdriver.runtime import guestexec
from vmdriver.runtime.guest_stats import spec_of
from vmdriver.runtime.guestsignal import SignalOutcome, signal_guest
from vmdriver.runtime.guestwatch import GuestWatch
from vmdriver.runtime.metrics import VmMetrics
from vmdriver.runtime.record import VMRecord
from vmdriver.runtime.state import ExitResult
from vmdriver.runtime.supervisor import Supervisor, VMInfo
from vmdriver.spec import StopSignal

log = logging.getLogger(__name__)

#: Format of ``driver_state``; bump on incompatible changes.
STATE_VERSION = 2


@dataclass
class Task:
    """One Nomad task and the id of its VM in the supervisor (the same id)."""

    id: str
    alloc_id: str
    name: str
    completed_at: float | None = None
    oom_killed: bool = False
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)
    #: Watches the guest come up (ready, agent, IP) for task events.
    guest_watch: asyncio.Task[None] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class TaskEvent:
    """A line for Nomad's task event stream."""

    task_id: str
    alloc_id: str
    name: str
    message: str
    timestamp: float
    annotations: dict[str, str]


class EventHub:
    """Fan-out of task events to every open TaskEvents stream (thread-safe queues)."""

    def __init__(self) -> None:
        self._subscribers: list[queue.Queue[TaskEvent]] = []

    def subscribe(self) -> queue.Queue[TaskEvent]:
        """A new queue receiving every later event."""
        q: queue.Queue[TaskEvent] = queue.Queue(maxsize=1000)
        self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue[TaskEvent]) -> None:
        """Stop feeding ``q``."""
        with contextlib.suppress(ValueError):
            self._subscribers.remove(q)

    def emit(self, task: Task, message: str, **annotations: str) -> None:
        """Send an event about ``task``."""
        event = TaskEvent(task.id, task.alloc_id, task.name, message, time.time(), annotations)
        for q in list(self._subscribers):
            with contextlib.suppress(queue.Full):
                q.put_nowait(event)


def _check_log_fifo(path: Path | None) -> None:
    """Refuse to start when Nomad's log FIFO has no reader (opening it would block)."""
    if path is None:
        return
    try:
        if not stat.S_ISFIFO(path.stat().st_mode):
            return
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise LaunchError(f"nobody reads the log FIFO {path} (is logmon running?)") from None
        raise LaunchError(f"cannot open the log FIFO {path}: {exc.strerror}") from None
    os.close(fd)


class TaskTable:
    """Nomad tasks of this plugin process, mapped onto the shared supervisor."""

    def __init__(self, supervisor: Supervisor, events: EventHub) -> None:
        self.supervisor = supervisor
        self.events = events
        self._tasks: dict[str, Task] = {}
        #: The Prometheus endpoint, once ``metrics_address`` asked for one.
        self.metrics: VmMetrics | None = None
        self._metrics_poller: asyncio.Task[None] | None = None

    def get(self, task_id: str) -> Task:
        """The task with this id; :class:`TaskNotFound` otherwise."""
        try:
            return self._tasks[task_id]
        except KeyError:
            raise TaskNotFound(f"no task with id {task_id!r} in this plugin") from None

    def find(self, task_id: str) -> Task | None:
        """The task with this id, if known."""
        return self._tasks.get(task_id)

    def info(self, task_id: str) -> VMInfo:
        """What the supervisor says of the task's VM."""
        return self.supervisor.info(self.get(task_id).id)

    def driver_state(self, task: Task) -> bytes:
        """What a later plugin process needs to re-attach, as JSON."""
        return json.dumps({
            "version": STATE_VERSION,
            "task": {"id": task.id, "alloc_id": task.alloc_id, "name": task.name},
            "record": self.supervisor.record(task.id).model_dump(mode="json"),
        }).encode()

    def __len__(self) -> int:
        return len(self._tasks)

    async def counts(self) -> tuple[int, int]:
        """``(running, exited)`` VMs of known tasks: the virt driver's active/inactive.

        A coroutine so it reads the table on the loop, between its changes. An
        exited task counts until DestroyTask forgets it (libvirt's "defined but
        not running"); one the supervisor already dropped mid-destroy, not at all.
        """
        running = exited = 0
        for task_id in list(self._tasks):
            try:
                result = self.supervisor.info(task_id).result
            except TaskNotFound:
                continue
            if result is None:
                running += 1
            else:
                exited += 1
        return running, exited

    async def start(self, plan: StartPlan) -> Task:
        """Launch (confined to the task's cgroups) and register a VM."""
        if plan.task_id in self._tasks:
            raise InputError("task is already started", where=plan.task_id)
        _check_log_fifo(plan.stdout)
        _check_log_fifo(plan.stderr)
        self.ensure_metrics()
        t0 = time.monotonic()
        info = await self.supervisor.start(plan.request(self.supervisor.host.state_dir))
        task = Task(plan.task_id, plan.alloc_id, plan.name)
        if self.metrics is not None:
            self.metrics.started(task.id, task.name, time.monotonic() - t0)
        self._register(task)
        self.events.emit(task, f"VM started (pid {info.pid}, {info.accelerator})",
                         accelerator=info.accelerator)
        for warning in info.warnings:
            self.events.emit(task, f"running without a cgroup limit: {warning}")
        return task

    async def recover(self, task_id: str, driver_state: bytes) -> Task:
        """Re-attach to a running VM from its driver_state; a no-op if already known."""
        if task_id in self._tasks:
            return self._tasks[task_id]
        try:
            state = json.loads(driver_state)
            record = VMRecord.model_validate(state["record"])
            info = state["task"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"driver_state is not vmdriver's: {exc}", where=task_id) from None
        self.ensure_metrics()
        vm = await self.supervisor.recover(record)  # VMInfo
        task = Task(task_id or info["id"], info.get("alloc_id", ""), info.get("name", record.task))
        self._register(task)
        self.events.emit(task, f"re-attached to the running VM (pid {vm.pid})")
        return task

    def _register(self, task: Task) -> None:
        self._tasks[task.id] = task
        task.watcher = asyncio.create_task(self._watch(task), name=f"nomad task {task.id}")
        task.guest_watch = asyncio.create_task(self._watch_guest(task), name=f"guest of {task.id}")

    async def _watch_guest(self, task: Task) -> None:
        """Guest ready, agent connected, IP known: task events (and the boot time metric)."""
        def emit(kind: str, message: str, annotations: dict[str, str]) -> None:
            self.events.emit(task, message, **annotations)
            if kind == "agent" and self.metrics is not None:
                self.metrics.booted(task.id, float(annotations["seconds"]))

        with contextlib.suppress(Exception):
            await GuestWatch(self.supervisor, task.id, emit).run()

    async def _watch(self, task: Task) -> None:
        """Note the end of a VM: time, OOM kill, an event."""
        try:
            result = await self.supervisor.wait(task.id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("task %s: supervising its VM failed", task.id)
            self.events.emit(task, f"VM supervision failed: {exc}")
            task.completed_at = time.time()
            return
        task.completed_at = time.time()
        task.oom_killed = result.signal == 9 and self.supervisor.oom_killed(task.id)
        text = result.describe() + (" (out of memory)" if task.oom_killed else "")
        if self.metrics is not None:
            self.metrics.stopped(result.kind)
        self.events.emit(task, f"VM exited: {text}", exit_code=str(result.exit_code),
                         outcome=result.kind.name.lower())

    async def wait(self, task_id: str) -> ExitResult:
        """Block until the task's VM ends."""
        task = self.get(task_id)
        result = await self.supervisor.wait(task.id)
        if task.watcher is not None:
            # Let the watcher record OOM and completion time before answering.
            await asyncio.shield(task.watcher)
        return result

    async def stop(self, task_id: str, timeout: float | None, signal: str) -> None:
        """The graceful ladder with Nomad's timeout and signal; unknown ids are already stopped."""
        task = self.find(task_id)
        if task is None or self.supervisor.info(task.id).result is not None:
            return
        try:
            sig = StopSignal.parse(signal) if signal else None
        except ValueError:
            raise InputError("unsupported signal", where=task_id, value=signal,
                             allowed=[s.value for s in StopSignal]) from None
        self.events.emit(task, "stopping the VM" + (f" (timeout {timeout:g}s)" if timeout else ""))
        await self.supervisor.stop(task.id, timeout, sig)

    async def destroy(self, task_id: str, force: bool) -> None:
        """Forget a task; with ``force`` kill a VM that still runs."""
        task = self.find(task_id)
        if task is None:
            return
        if self.supervisor.info(task.id).result is None and not force:
            raise InputError("task is still running; stop it first or destroy with force",
                             where=task_id)
        await self.supervisor.destroy(task.id, force=force)
        if task.guest_watch is not None:
            task.guest_watch.cancel()
        if task.watcher is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task.watcher)
        del self._tasks[task_id]

    async def detach_all(self) -> None:
        """Stop supervising every VM but leave them running (the plugin is going away)."""
        for task in self._tasks.values():
            for watcher in (task.watcher, task.guest_watch):
                if watcher is not None:
                    watcher.cancel()
        await self.supervisor.detach_all()
        self._tasks.clear()

    # Section: into the guest (exec, signals) and metrics

    def agent(self, task_id: str) -> GuestAgent:
        """The task's guest agent; a clear StateError if the task was started without one."""
        task = self.get(task_id)
        if not spec_of(self.supervisor, task.id).guest_agent:
            raise StateError(f"of task {task.name!r}", "without a guest agent",
                             "started with guest_agent = true (exec and signals go through it)")
        return self.supervisor.agent(task.id)

    async def exec(self, task_id: str, argv: list[str], on_output: guestexec.OutputSink, *,
                   stdin: AsyncIterator[bytes] | None = None,
                   timeout: float | None = None) -> guestexec.ExecResult:
        """Run ``argv`` in the task's guest through its agent, output streamed as it comes."""
        self._require_running(task_id)
        agent = self.agent(task_id)
        await guestexec.require_agent(agent, f"exec in task {self.get(task_id).name!r}")
        return await guestexec.run(agent, argv, on_output, stdin=stdin, timeout=timeout)

    async def signal(self, task_id: str, sig: str) -> SignalOutcome:
        """Nomad's SignalTask: see vmdriver.runtime.guestsignal for what each signal means."""
        self._require_running(task_id)
        task = self.get(task_id)
        outcome = await signal_guest(self.agent(task_id), sig,
                                     powerdown=lambda: self.supervisor.qmp(task.id, "system_powerdown"))
        self.events.emit(task, outcome.describe(), signal=outcome.signal)
        return outcome

    def _require_running(self, task_id: str) -> None:
        info = self.info(task_id)
        if info.result is not None:
            raise StateError(f"of task {self.get(task_id).name!r}", "exited", "running")

    def ensure_metrics(self) -> None:
        """Serve metrics on the host config's ``metrics_address`` (once; none if empty)."""
        addr = self.supervisor.host.metrics_address
        if not addr or self.metrics is not None:
            return
        metrics = VmMetrics()
        host, port = metrics.serve(addr)
        log.info("metrics on http://%s:%d/metrics", host, port)
        self.metrics = metrics
        self._metrics_poller = asyncio.create_task(
            metrics.poll(self.supervisor, self._task_name), name="metrics poller")

    def _task_name(self, vm_id: str) -> str:
        task = self.find(vm_id)
        return task.name if task else vm_id

    def describe(self) -> dict[str, Any]:
        """A summary for logs."""
        return {tid: self.supervisor.info(tid).state.value for tid in self._tasks}
