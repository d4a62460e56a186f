"""A VM's stop ladder: suspend, ask the guest, send the stop signal, then SIGKILL.

Split off :mod:`vmdriver.runtime.vm` to keep that module readable.
:class:`StopLadder` is a base class of :class:`~vmdriver.runtime.vm.VM`: the
steps stay methods of the VM they stop and work on its state, which is
declared here only so the type checker knows it (``VM`` sets it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from vmdriver.errors import MonitorError
from vmdriver.qemu.agent import GuestAgent
from vmdriver.qemu.monitor import Monitor
from vmdriver.runtime.process import ManagedProcess, signal_jailed
from vmdriver.runtime.state import ExitResult, VMState
from vmdriver.runtime.suspend import suspend
from vmdriver.runtime.taskdir import VMDirs
from vmdriver.spec import StopSignal, VMSpec

log = logging.getLogger(__name__)

#: How long QEMU gets to exit after the stop signal before SIGKILL, when the
#: graceful window already ran out (QEMU exits on SIGINT/SIGTERM at once).
SIGNAL_GRACE_S = 5.0


class StopLadder:
    """The stop ladder's steps, as methods of :class:`~vmdriver.runtime.vm.VM`."""

    id: str
    spec: VMSpec
    dirs: VMDirs
    state: VMState
    qemu_pid: int | None
    _proc: ManagedProcess | None
    _monitor: Monitor | None
    _powerdown: asyncio.Event
    _stop_requested: bool
    _forced: bool

    async def wait(self) -> ExitResult:
        """Wait for the VM to end (:meth:`VM.wait <vmdriver.runtime.vm.VM.wait>`)."""
        raise NotImplementedError

    async def _stop(self, timeout: float | None, signal: StopSignal | None) -> ExitResult:
        assert self._proc is not None
        policy = self.spec.shutdown
        timeout = policy.timeout_s if timeout is None else timeout
        sig = (signal or policy.signal).number
        self._stop_requested = True
        self.state = VMState.STOPPING
        if self.spec.suspend_to and self._monitor and self._monitor.connected \
                and await suspend(self._monitor, self.spec, self.dirs):
            # Saved (runtime.suspend): QEMU may end; the next start resumes the guest.
            with contextlib.suppress(MonitorError):
                await self._monitor.execute("quit")
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(self.wait(), timeout)
        if policy.graceful and self._monitor and self._monitor.connected:
            if await self._ask_guest():
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(self.wait(), timeout)
                log.info("VM %s: guest did not power off within %.1fs", self.id, timeout)
            self._forced = True
            grace = min(SIGNAL_GRACE_S, max(timeout, 1.0))
        else:
            grace = timeout
        self._signal(sig)
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(self.wait(), grace)
        self._forced = True
        self._proc.kill_group()
        return await self.wait()

    def _signal(self, sig: int) -> None:
        """Send ``sig`` to QEMU itself (in a jail: :func:`signal_jailed`)."""
        assert self._proc is not None
        if self.qemu_pid is None:
            self._proc.send_signal(sig)
        else:
            signal_jailed(self._proc, self.qemu_pid, sig)

    async def _ask_guest(self) -> bool:
        """The guest agent's ``guest-shutdown`` when asked for and answering, else ACPI."""
        if self.spec.shutdown.via_agent and self.spec.guest_agent:
            agent = GuestAgent(self.dirs.qga_socket)
            try:
                await agent.shutdown()
            except MonitorError as exc:
                log.info("VM %s: guest agent shutdown failed (%s); pressing the power button",
                         self.id, exc)
            else:
                return True
        return await self._press_power_button()

    async def _press_power_button(self) -> bool:
        """ACPI power button over QMP, confirmed by the POWERDOWN event."""
        assert self._monitor is not None
        try:
            await self._monitor.execute("system_powerdown")
            await asyncio.wait_for(self._powerdown.wait(), self.spec.shutdown.powerdown_confirm_s)
        except (MonitorError, TimeoutError) as exc:
            log.warning("VM %s: power button press not confirmed: %s", self.id, exc)
            return False
        return True
