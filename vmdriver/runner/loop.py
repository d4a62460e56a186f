"""The runner's run loop: one VM from start to exit, with VM-Operator's states.

INITIALIZING (config read, template rendered) → STARTING (helpers and QEMU start
through the supervisor) → BOOTING (the guest runs) → BOOTED (the guest agent
answered; its ``guest-get-osinfo`` goes into the status) → TERMINATING (a stop was
asked for) → STOPPED (QEMU exited). Each change is logged and written to
``<runtimeDir>/status.json``.

Shutdown, bounded as VM-Operator's: the first SIGTERM/SIGINT runs the spec's
stop ladder in the supervisor (``guest-shutdown`` through the guest agent when it
answers, else the ACPI power button confirmed by QEMU's POWERDOWN event). The
runner keeps the deadline itself, ``powerdownTimeout`` after the stop began, so a
config change during the shutdown moves it; at the deadline QEMU gets SIGTERM
(through the supervisor, which reaches a jailed QEMU too), then SIGKILL after
:data:`TERMINATE_GRACE_S`. A second signal kills at once. The
runner exits with QEMU's exit code.

While the VM runs, config file changes are applied (:mod:`vmdriver.runner.apply`)
or reported as needing a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from vmdriver.errors import MonitorError, StateError, TaskNotFound, VmdriverError
from vmdriver.qemu.devices import QGA_DEVICE
from vmdriver.runner import apply
from vmdriver.runner.changes import Changes, diff
from vmdriver.runner.config import RunnerConfig
from vmdriver.runner.launch import link_sockets
from vmdriver.runner.paths import RunnerPaths, prepare_dirs
from vmdriver.runner.status import RunState, Status, write_status
from vmdriver.runner.watch import watch_config
from vmdriver.runtime.record import VMRecord
from vmdriver.runtime.request import LaunchRequest, QmpCall
from vmdriver.runtime.state import ExitKind, ExitResult
from vmdriver.runtime.supervisor import Supervisor

log = logging.getLogger(__name__)

#: Seconds QEMU gets after SIGTERM at the deadline before SIGKILL.
TERMINATE_GRACE_S = 5.0
#: Seconds between guest agent pings while the guest boots.
BOOT_POLL_S = 1.0
#: Seconds between guest agent pings while no port event came (the event is the cue).
BOOT_FALLBACK_S = 5.0
#: Seconds the status follows the balloon after a change.
BALLOON_FOLLOW_S = 60.0
#: The supervisor's own ladder never ends a stop before the runner's deadline does.
_NO_TIMEOUT = 10.0 * 365 * 86400


class Runner:
    """One VM of one runner process."""

    def __init__(self, config_file: Path, config: RunnerConfig, paths: RunnerPaths,
                 request: LaunchRequest, sup: Supervisor) -> None:
        self.config_file, self.paths, self.sup = config_file, paths, sup
        # vCPUs are hot-plugged while QEMU is still paused, as VM-Operator does.
        self.request = dataclasses.replace(request, configure=self._configure)
        #: The config the VM was started with (restart-needed keys are relative to it)
        #: and the one last applied.
        self.started_config = self.config = config
        self.vm_id = request.vm_id
        self.status = Status(state=RunState.INITIALIZING)
        self.media = apply.Media(self._qmp, self._publish, self._add_fd)
        self._stop = asyncio.Event()
        self._deadline_moved = asyncio.Event()
        self._stop_began = 0.0
        self._signals = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        #: vCPUs the VM started with (after the hotplug while paused).
        self._start_cpus = 1

    # Section: states and status

    def _set(self, state: RunState, **changes: Any) -> None:
        if state != self.status.state:
            log.info("state %s", state)
        self.status = self.status.to(state, **changes)
        self._publish()

    def _publish(self) -> None:
        self.status = self.status.model_copy(update={"pending": self.media.pending(),
                                                     "updated": time.time()})
        if self.paths.runtime_dir.is_dir():
            with contextlib.suppress(OSError):
                write_status(self.paths.status_file, self.status)

    # Section: the whole run

    async def run(self) -> int:
        """Start, supervise and stop the VM; QEMU's exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            await self._adopt_or_clear()
            prepare_dirs(self.paths)
            self.paths.pid_file.write_text(f"{os.getpid()}\n", encoding="utf-8")
            log.info("state %s", RunState.INITIALIZING)
            self._publish()
            starting = Status.starting(self.config)
            self._set(RunState.STARTING, cpus=starting.cpus, ram=starting.ram)
            if self.vm_id not in self.sup:
                await self.sup.start(self.request)
            link_sockets(self.request.dirs)
            self._set(RunState.BOOTING)
            result = await self._supervise()
            return await self._stopped(result)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self._cleanup()

    async def _supervise(self) -> ExitResult:
        self._spawn(self._boot())
        self._spawn(self._watch())
        await self._initial_changes()
        ended = asyncio.ensure_future(self.sup.wait(self.vm_id))
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([ended, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not ended.done():
            await self._shutdown(ended)
        return await ended

    async def _stopped(self, result: ExitResult) -> int:
        code = result.exit_code if result.exit_code >= 0 else 1
        log.info("QEMU exited with code %d: %s", code, result.describe())
        self.paths.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._set(RunState.STOPPED, exit_code=code)
        if (self.config.guest_shutdown_stops and result.kind is ExitKind.GUEST_POWEROFF
                and not self._stop.is_set()):
            # No pod restart (restartPolicy Always) boots it again: the runner stays,
            # STOPPED, until it is stopped itself (VM-Operator sets the VM's state to Stopped).
            log.info("the guest shut down and guestShutdownStops is set: staying stopped")
            await self._stop.wait()
        return code

    async def _cleanup(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.media.close()
        with contextlib.suppress(Exception):
            await self.sup.kill_all()
        await self.sup.close()
        # As VM-Operator: the runtime dir goes with the runner.
        shutil.rmtree(self.paths.runtime_dir, ignore_errors=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adopt_or_clear(self) -> None:
        """A runner killed with SIGKILL left its VM running: take it over again.

        The record in the runtime dir names QEMU and its helpers (swtpm) by pid and
        start time. A VM that is gone has its helpers stopped and its runtime dir
        removed by the supervisor, so nothing of it is left behind either way.
        """
        record = VMRecord.load(self.request.dirs.record)
        if record is None:
            return
        try:
            await self.sup.recover(record)
        except StateError:
            log.info("the VM of an earlier runner is gone; its helpers were stopped")
            return
        if record.id != self.vm_id:
            log.warning("stopping VM %s, left running by an earlier runner", record.id)
            await self.sup.kill(record.id)
            await self.sup.destroy(record.id)
            return
        log.warning("took over VM %s, left running by an earlier runner (pid %s)", record.id,
                    record.pid)

    # Section: booting

    async def _boot(self) -> None:
        """BOOTED once the guest agent answers; its OS info into the status."""
        if not self.request.spec.guest_agent:
            return  # as VM-Operator: without a guest agent the VM stays BOOTING
        agent = self.sup.agent(self.vm_id)
        async with self.sup.events(self.vm_id, "VSERPORT_CHANGE") as ports:
            # Ping first: qemu-ga may have opened its port before we listened. Then again
            # when the guest opens it, and every BOOT_FALLBACK_S anyway: a VM taken over
            # from an earlier runner may have been started without the port's id (QEMU
            # then sends no event), and a ping can fail while qemu-ga is still starting.
            while not await agent.ping():
                if not await _agent_port_opened(ports, BOOT_FALLBACK_S):
                    return  # the VM ended
        osinfo: dict[str, Any] | None = None
        with contextlib.suppress(MonitorError):
            osinfo = dict(await agent.call("guest-get-osinfo"))
        if self.status.state == RunState.BOOTING:
            self._set(RunState.BOOTED, osinfo=osinfo, ram=await self._ram(), cpus=await self._cpus())

    async def _qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return await self.sup.qmp(self.vm_id, cmd, args)

    async def _add_fd(self, fd: int) -> str:
        return await self.sup.add_fd(self.vm_id, fd)

    async def _ram(self) -> int:
        try:
            return int((await self._qmp("query-balloon"))["actual"])
        except (MonitorError, StateError, KeyError):
            return self.status.ram

    async def _cpus(self) -> int:
        try:
            return await apply.count_cpus(self._qmp)
        except (MonitorError, StateError):
            return self.status.cpus

    # Section: runtime changes

    async def _configure(self, qmp: QmpCall) -> None:
        """While QEMU is still paused (the supervisor's launch, before ``cont``): the vCPUs
        beyond the boot CPU, so the guest boots with them. A failure is logged; the VM
        starts with the CPUs it has."""
        wanted = self.config.vm.current_cpus
        if wanted <= 1:
            return
        try:
            self._start_cpus = await apply.set_cpus(qmp, wanted)
        except MonitorError as exc:
            log.error("vCPUs not hot-plugged at start: %s", exc)  # noqa: TRY400 (one line)
            return
        log.info("vCPUs at start: %d (wanted %d)", self._start_cpus, wanted)

    async def _initial_changes(self) -> None:
        """vCPUs plugged while paused that a guest without udev leaves offline."""
        if self._start_cpus > 1:
            self._spawn(self._online_vcpus(self._start_cpus))

    async def _watch(self) -> None:
        async for update in watch_config(self.config_file):
            if isinstance(update, VmdriverError):
                continue  # logged by the watcher; the VM keeps its config
            changes = diff(self.config, update)
            restart = diff(self.started_config, update).restart_needed
            self.config = update
            for key in restart:
                if key not in self.status.restart_needed:
                    log.warning("config %s changed: takes effect when the VM starts again", key)
            self.status = self.status.model_copy(update={"restart_needed": restart})
            self._publish()
            await self._apply(changes)

    async def _apply(self, changes: Changes) -> None:
        """Apply one config change to the running VM; errors are logged, not fatal."""
        if changes.powerdown_timeout is not None:
            log.info("powerdownTimeout is now %d s", changes.powerdown_timeout)
            self._deadline_moved.set()
        if not self.status.state.vm_active:
            return  # VM-Operator applies the rest only while BOOTING or BOOTED
        try:
            await self._apply_live(changes)
        except (MonitorError, StateError, TaskNotFound) as exc:
            log.error("config change not applied: %s", exc)  # noqa: TRY400 (one line, no trace)
        self._publish()

    async def _apply_live(self, changes: Changes) -> None:
        if changes.reset:
            log.info("resetCounter increased: resetting the VM")
            await self._qmp("system_reset")
        if changes.ram is not None:
            log.info("balloon target %d bytes", changes.ram)
            await self._qmp("balloon", {"value": changes.ram})
        if changes.cpus is not None:
            count = await apply.set_cpus(self._qmp, changes.cpus)
            log.info("vCPUs: %d (wanted %d)", count, changes.cpus)
            self._spawn(self._online_vcpus(count))
            self.status = self.status.model_copy(update={"cpus": count})
        for cd, image in changes.media.items():
            self.media.change(cd, image)
        if changes.ram is not None:
            self._spawn(self._follow_balloon(changes.ram))

    async def _follow_balloon(self, target: int) -> None:
        """The status's ``ram`` as the guest gives memory back or takes it, from QEMU's
        BALLOON_CHANGE events (as VM-Operator), for up to BALLOON_FOLLOW_S."""
        async with self.sup.events(self.vm_id, "BALLOON_CHANGE") as changes:
            # Read once: the guest may have moved before we listened.
            self._show_ram(await self._ram())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BALLOON_FOLLOW_S):
                    while self.status.ram != target:
                        event = await anext(changes, None)
                        if event is None:
                            return  # the VM ended
                        self._show_ram(int(event["data"]["actual"]))

    def _show_ram(self, ram: int) -> None:
        if ram != self.status.ram:
            self.status = self.status.model_copy(update={"ram": ram})
            self._publish()

    async def _online_vcpus(self, target: int) -> None:
        """Bring hot-plugged vCPUs online through the guest agent, if it answers.

        A guest with udev onlines them itself; a minimal guest leaves them offline.
        The guest sees a new CPU only once it handled the ACPI hotplug event: retry
        until it has ``target`` online, for a while.
        """
        if not self.request.spec.guest_agent:
            return
        agent = self.sup.agent(self.vm_id)
        deadline = time.monotonic() + BALLOON_FOLLOW_S
        while time.monotonic() < deadline:
            with contextlib.suppress(MonitorError):
                vcpus = await agent.call("guest-get-vcpus")
                offline = [{"logical-id": v["logical-id"], "online": True} for v in vcpus
                           if not v.get("online") and v.get("can-offline", True)]
                if offline:
                    await agent.call("guest-set-vcpus", {"vcpus": offline})
                elif len(vcpus) >= target:
                    return
            await asyncio.sleep(BOOT_POLL_S)

    # Section: stopping

    def _on_signal(self) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("stop requested")
            self._stop.set()
            return
        log.warning("second stop request: killing the VM")
        self._spawn(self.sup.kill_all())

    def _remaining(self) -> float:
        return self._stop_began + self.config.vm.powerdown_timeout - time.monotonic()

    async def _shutdown(self, ended: asyncio.Future[ExitResult]) -> None:
        """The stop ladder, bounded by ``powerdownTimeout`` (which may change meanwhile)."""
        self._set(RunState.TERMINATING)
        self._stop_began = time.monotonic()
        stopper = asyncio.ensure_future(self.sup.stop(self.vm_id, timeout=_NO_TIMEOUT))
        while not ended.done() and self._remaining() > 0:
            self._deadline_moved.clear()
            moved: asyncio.Future[Any] = asyncio.ensure_future(self._deadline_moved.wait())
            await asyncio.wait([ended, moved], timeout=self._remaining(),
                               return_when=asyncio.FIRST_COMPLETED)
            moved.cancel()
        if not ended.done():
            await self._terminate(ended)
        await asyncio.gather(stopper, return_exceptions=True)

    async def _terminate(self, ended: asyncio.Future[ExitResult]) -> None:
        log.warning("the guest did not power off within powerdownTimeout (%d s): "
                    "terminating QEMU", self.config.vm.powerdown_timeout)
        self.sup.signal(self.vm_id, signal.SIGTERM)
        await asyncio.wait([ended], timeout=TERMINATE_GRACE_S)
        if not ended.done():
            await self.sup.kill(self.vm_id)


async def _agent_port_opened(ports: AsyncIterator[dict[str, Any]], timeout: float) -> bool:
    """Wait until the guest opens the agent's port or ``timeout`` passes; False if the
    VM ended instead."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            async for event in ports:
                data = event.get("data", {})
                if data.get("id") == QGA_DEVICE and data.get("open"):
                    return True
            return False
    return True
