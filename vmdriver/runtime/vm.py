"""One supervised VM: launch paused, configure over QMP, continue, watch, stop.

Upper half: :meth:`VM.launch`, :meth:`VM.stop`, :meth:`VM.kill`, :meth:`VM.wait`.
Bottom half: one watcher task per VM that records QMP events (and passes them to
the faces' listeners, :attr:`VM.listeners`) and the process exit. Its errors are
never lost: they fail the VM's result future, which :meth:`VM.wait` re-raises.
The steps of a stop come from a base class in a module of their own
(:class:`~vmdriver.runtime.stopladder.StopLadder`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener

from vmdriver.errors import HostError, LaunchError, MonitorError, StateError
from vmdriver.jail.plan import LAUNCH_ENV, JailSpec, decode_exit, filter_env, jailed_pid, wrap_argv
from vmdriver.qemu.argv import RenderContext, render_argv
from vmdriver.qemu.monitor import LIFECYCLE_EVENTS, Monitor
from vmdriver.runtime.events import Listeners
from vmdriver.runtime.helpers import Helper, HelperRecord
from vmdriver.runtime.jailing import JailRecord
from vmdriver.runtime.logs import Outputs, flushed, tail
from vmdriver.runtime.process import ManagedProcess, close_fds
from vmdriver.runtime.record import VMRecord
from vmdriver.runtime.request import QmpCall
from vmdriver.runtime.state import ExitResult, VMState, classify
from vmdriver.runtime.stopladder import StopLadder
from vmdriver.runtime.taskdir import TaskDir, VMDirs
from vmdriver.spec import StopSignal, VMSpec

log = logging.getLogger(__name__)

QMP_CONNECT_TIMEOUT_S = 15.0


class VM(StopLadder):
    """A VM under supervision. Create with :meth:`launch` or :meth:`attach`."""

    def __init__(self, vm_id: str, spec: VMSpec, dirs: VMDirs) -> None:
        self.id = vm_id
        self.spec = spec
        self.dirs = dirs
        self.state = VMState.DEFINED
        self.argv: tuple[str, ...] = ()
        self.started_at = 0.0
        self.stdout = dirs.task.stdout
        self.stderr = dirs.task.stderr
        #: Set by the supervisor before launch, so the record carries them.
        self.helpers: list[HelperRecord] = []
        self.cgroup_paths: tuple[str, ...] = ()
        self.cgroups_created: tuple[str, ...] = ()
        self.remove_task_dir = False
        #: Copies QEMU's output into the bounded logs (:mod:`vmdriver.runtime.logs`).
        self.log_writer: Helper | None = None
        #: Loads a saved state into a QEMU started with ``spec.incoming``, before ``cont``.
        self.incoming: Callable[[Monitor], Awaitable[None]] | None = None
        #: The face's QMP changes while paused, after ``incoming``, before ``cont``.
        self.configure: Callable[[QmpCall], Awaitable[None]] | None = None
        #: QEMU's pid inside a jail (the tracked process is then the jail's monitor).
        self.qemu_pid: int | None = None
        self.jail: JailRecord | None = None
        #: The faces' event listeners (``Supervisor.on_event``), dropped when the VM ends.
        self.listeners = Listeners(f"VM {vm_id}")
        self._proc: ManagedProcess | None = None
        self._monitor: Monitor | None = None
        self._listener: EventListener | None = None
        self._events: list[dict[str, Any]] = []
        self._powerdown = asyncio.Event()
        self._stop_requested = False
        self._forced = False
        self._result: asyncio.Future[ExitResult] = asyncio.get_running_loop().create_future()
        self._watcher: asyncio.Task[None] | None = None
        self._stopper: asyncio.Task[ExitResult] | None = None

    # Section: public interface

    @property
    def pid(self) -> int | None:
        """QEMU's own pid while it is known (inside a jail: not the tracked monitor's)."""
        return self.qemu_pid or (self._proc.pid if self._proc else None)

    @property
    def result(self) -> ExitResult | None:
        """How the VM ended, once it has."""
        return self._result.result() if self._result.done() and not self._result.exception() else None

    async def launch(
        self,
        ctx: RenderContext,
        *,
        env: Mapping[str, str],
        stdout: Path | None = None,
        stderr: Path | None = None,
        outputs: Outputs | None = None,
        on_spawn: Callable[[int], None] | None = None,
        jail: JailSpec | None = None,
    ) -> None:
        """Start QEMU paused, connect QMP, watch it, then let the guest run.

        ``on_spawn(pid)`` runs right after QEMU is spawned, while it is still
        paused (the supervisor puts it into its cgroups there). With ``jail``,
        the spawned process is the jail's monitor and QEMU its only child
        (:attr:`qemu_pid`); killing the monitor kills QEMU. ``outputs``: what QEMU
        writes to (pipes of a log writer); without it QEMU opens ``stdout``/``stderr``.
        The write ends are closed here on every path.
        """
        self._require(VMState.DEFINED, "defined")
        self.state = VMState.LAUNCHING
        self.stdout, self.stderr = stdout or self.stdout, stderr or self.stderr
        outputs = outputs or Outputs(self.stdout, self.stderr)
        self.log_writer = outputs.writer
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            theirs.set_inheritable(True)
            ctx = dataclasses.replace(ctx, qmp_fd=theirs.fileno())
            self.argv = render_argv(self.spec, ctx)
            pass_fds = (theirs.fileno(), *ctx.pass_fds)
            argv, env = self.argv, dict(env)
            if jail is not None:
                jail = dataclasses.replace(jail, fds=pass_fds, env=filter_env(env)[0])
                argv, env = wrap_argv(self.argv, jail), dict(LAUNCH_ENV)
            # fork+exec blocks for tens of ms on a busy host: keep the event loop (and
            # the QMP handshakes of VMs launched alongside) going meanwhile.
            spawning = asyncio.ensure_future(asyncio.to_thread(
                ManagedProcess.spawn, argv, cwd=self.dirs.task.path, env=env,
                stdout=outputs.stdout, stderr=outputs.stderr, pass_fds=pass_fds,
            ))
            try:
                self._proc = await asyncio.shield(spawning)
            except asyncio.CancelledError:
                # The thread finishes the spawn regardless; own the process so the
                # abort below kills it.
                with contextlib.suppress(Exception):
                    self._proc = await spawning
                raise
            theirs.close()
            close_fds(ctx.pass_fds)
            outputs.close()
            self.started_at = time.time()
            if jail is not None:
                self.qemu_pid = await asyncio.to_thread(jailed_pid, self._proc.pid)
            if on_spawn is not None:
                on_spawn(self._proc.pid)
            await self._connect(ours)
            self._watcher = asyncio.create_task(self._watch(), name=f"watcher of VM {self.id}")
            self.save_record()
            assert self._monitor is not None
            if self.incoming is not None:
                await self.incoming(self._monitor)
            if self.configure is not None:
                await self.configure(self._monitor.execute)
            await self._monitor.execute("cont")
        except BaseException:
            theirs.close()
            close_fds(ctx.pass_fds)
            outputs.close()
            await self._abort_launch()
            raise
        self.state = VMState.RUNNING

    @classmethod
    async def attach(cls, record: VMRecord, log_writer: Helper | None = None) -> VM:
        """Take over a VM started by an earlier supervisor process, without restarting it.

        ``log_writer``: its log writer, found again among its helpers.
        """
        spec = VMSpec.model_validate(record.spec)
        dirs = VMDirs(TaskDir(Path(record.alloc_dir), record.task), Path(record.runtime_dir),
                      Path(record.data_dir), Path(record.qmp_socket).name,
                      Path(record.qga_socket).name, Path(record.qmp_socket).parent)
        vm = cls(record.id, spec, dirs)
        vm.argv, vm.started_at = tuple(record.argv), record.started_at
        vm.stdout, vm.stderr = Path(record.stdout), Path(record.stderr)
        vm.helpers = list(record.helpers)
        vm.log_writer = log_writer
        vm.cgroup_paths, vm.cgroups_created = tuple(record.cgroup_paths), tuple(record.cgroups_created)
        vm.remove_task_dir = record.remove_task_dir
        vm.qemu_pid, vm.jail = record.qemu_pid, record.jail
        proc = ManagedProcess.attach(record.pid, record.pid_start_time)
        if proc is None:
            raise StateError(vm.id, "gone (its QEMU process no longer exists)", "running")
        vm._proc = proc
        monitor = Monitor(f"{record.task}")
        try:
            await monitor.connect(Path(record.qmp_socket), timeout=QMP_CONNECT_TIMEOUT_S)
            vm._monitor = monitor
        except MonitorError as exc:
            # QMP does not answer (hung, or its socket is gone): the VM is still ours to
            # stop, by its pid and start time; stops skip the power button.
            log.warning("VM %s: re-attached without QMP: %s", vm.id, exc)
        vm._watcher = asyncio.create_task(vm._watch(), name=f"watcher of VM {vm.id}")
        vm.state = VMState.RUNNING
        return vm

    async def wait(self) -> ExitResult:
        """Wait for the VM to end; re-raises any error of the watcher."""
        return await asyncio.shield(self._result)

    async def stop(self, timeout: float | None = None,
                   signal: StopSignal | None = None) -> ExitResult:
        """Stop the VM with the spec's ladder; concurrent calls share one stop."""
        if self._result.done():
            return await self.wait()
        if self._stopper is None:
            self._stopper = asyncio.create_task(
                self._stop(timeout, signal), name=f"stopper of VM {self.id}"
            )
        return await asyncio.shield(self._stopper)

    async def kill(self) -> ExitResult:
        """Stop at once with SIGKILL (Nomad's forced DestroyTask)."""
        if self._proc and not self._result.done():
            self._stop_requested = self._forced = True
            self.state = VMState.STOPPING
            self._proc.kill_group()
        return await self.wait()

    async def detach(self) -> None:
        """Stop supervising but leave QEMU running (a plugin shutting down)."""
        if self._watcher:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._monitor:
            await self._monitor.disconnect()
        if self._proc:
            self._proc.close()

    async def qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Run a QMP command on the running VM."""
        self._require(VMState.RUNNING, "running")
        assert self._monitor is not None
        return await self._monitor.execute(cmd, args)

    async def add_fd(self, fd: int) -> str:
        """Hand QEMU an open file over QMP (``add-fd``, SCM_RIGHTS): the ``/dev/fdset/N``
        path its commands then take. A jailed QEMU can open no host path itself."""
        self._require(VMState.RUNNING, "running")
        if self._monitor is None or not self._monitor.connected:
            raise StateError(self.id, "without a QMP connection", "connected over QMP")
        return f"/dev/fdset/{await self._monitor.add_fd(fd)}"

    def signal(self, sig: int) -> None:
        """Send ``sig`` to QEMU (jailed or not) with the effect it would have unjailed."""
        if self._proc is not None and not self._result.done():
            self._signal(sig)

    def record(self) -> VMRecord:
        """What a later supervisor needs to re-attach."""
        assert self._proc is not None
        d = self.dirs
        return VMRecord(
            id=self.id, task=d.task.task, alloc_dir=str(d.task.alloc_dir),
            runtime_dir=str(d.runtime), data_dir=str(d.data),
            pid=self._proc.pid, pid_start_time=self._proc.start_time,
            qmp_socket=str(d.qmp_socket), qga_socket=str(d.qga_socket), argv=list(self.argv),
            spec=self.spec.model_dump(mode="json"), started_at=self.started_at,
            stdout=str(self.stdout), stderr=str(self.stderr), helpers=self.helpers,
            cgroup_paths=list(self.cgroup_paths), cgroups_created=list(self.cgroups_created),
            remove_task_dir=self.remove_task_dir, qemu_pid=self.qemu_pid, jail=self.jail,
        )

    # Section: launch helpers

    def _require(self, state: VMState, words: str) -> None:
        if self.state is not state:
            raise StateError(self.id, self.state.value, words)

    async def _connect(self, sock: socket.socket) -> None:
        assert self._proc is not None
        self._monitor = Monitor(self.dirs.task.task)
        connect: asyncio.Future[None] = asyncio.ensure_future(
            self._monitor.connect(sock, QMP_CONNECT_TIMEOUT_S)
        )
        died = self._proc.wait()
        futures: list[asyncio.Future[Any]] = [connect, died]
        done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
        if connect in done and connect.exception() is None:
            return
        if connect not in done:
            # QEMU died first: its end of the socket is closed, so the handshake fails
            # on its own at once. Cancelling it instead upsets qemu.qmp's cleanup.
            done, _ = await asyncio.wait([connect], timeout=2)
            if not done:
                connect.cancel()
        with contextlib.suppress(asyncio.CancelledError, MonitorError):
            await connect
        try:
            # A failed handshake usually means QEMU is on its way out: report its exit.
            code, _sig = await asyncio.wait_for(asyncio.shield(died), 5)
        except TimeoutError:
            connect.result()
            raise
        await flushed(self.log_writer)  # QEMU's last words reach its stderr log
        raise LaunchError("QEMU exited during start-up", exit_code=code, stderr_tail=tail(self.stderr))

    async def _abort_launch(self) -> None:
        """Leave nothing behind after a failed launch."""
        if self._watcher:
            self._watcher.cancel()
        if self._proc:
            self._proc.kill_group()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._proc.wait(), 5)
            self._proc.close()
        if self._monitor:
            await self._monitor.disconnect()
        self._cleanup_files()
        self.state = VMState.EXITED

    def save_record(self) -> None:
        """Write the record for re-attaching (again, when the supervisor changed it)."""
        try:
            self.record().save(self.dirs.record)
        except OSError as exc:
            # Without a record the VM could not be found again: it must not run.
            raise HostError(f"cannot write the VM record {self.dirs.record}: "
                            f"{exc.strerror}") from None

    def _cleanup_files(self) -> None:
        for p in (self.dirs.qmp_socket, self.dirs.qga_socket, self.dirs.record):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    # Section: bottom half

    async def _watch(self) -> None:
        """Record events until QEMU exits, then settle the result."""
        assert self._proc is not None
        try:
            if self._monitor is None:
                code, sig = await asyncio.shield(self._proc.wait())  # cancelling us leaves it
            else:
                code, sig = await self._watch_events(self._monitor)
            self._cleanup_files()
            await flushed(self.log_writer)
            self.state = VMState.EXITED
            if self.qemu_pid and sig == 0:
                code, sig = decode_exit(code)  # the monitor reports QEMU's death by N as 128+N
            self._result.set_result(classify(
                self._events, code, sig, stop_requested=self._stop_requested, forced=self._forced,
                child=bool(self._proc and self._proc.child), stderr_tail=tail(self.stderr)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("watcher of VM %s failed", self.id)
            if not self._result.done():
                self._result.set_exception(exc)
        finally:
            self.listeners.close()

    async def _watch_events(self, monitor: Monitor) -> tuple[int, int]:
        assert self._proc is not None
        async with monitor.events() as listener:  # all: faces may want any
            self._listener = listener
            reader = asyncio.create_task(self._read_events(listener))
            try:
                code, sig = await asyncio.shield(self._proc.wait())
                # Take the events QEMU sent just before exiting, which may still be in flight.
                await monitor.wait_closed(1.0)
                for event in listener.clear():
                    self._on_event(dict(event))
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
        await monitor.disconnect()
        return code, sig

    async def _read_events(self, listener: EventListener) -> None:
        async for event in listener:
            self._on_event(dict(event))

    def _on_event(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        if name in LIFECYCLE_EVENTS:
            self._events.append(event)  # kept for the exit's classification only
        log.debug("VM %s event %s %s", self.id, name, event.get("data"))
        if name == "POWERDOWN":
            self._powerdown.set()
        self.listeners.emit(event)
