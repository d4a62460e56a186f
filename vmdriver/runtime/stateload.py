"""Loading a saved state into a QEMU started with ``-incoming defer``, and what follows.

The state file reaches QEMU through a socketpair that vmdriver feeds (QEMU 7.2
reads a plain file fd slowly); a stream QEMU refuses becomes one clear
:class:`LaunchError` with QEMU's last words; after the load the NICs announce
the guest and, with a guest agent, the guest's wall clock is set to now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from vmdriver.errors import LaunchError, MonitorError
from vmdriver.qemu import migration
from vmdriver.qemu.agent import GuestAgent
from vmdriver.qemu.monitor import Monitor
from vmdriver.runtime.snapstore import SnapshotDir

log = logging.getLogger(__name__)

Loader = Callable[[Monitor], Awaitable[None]]


def state_loader(snap: SnapshotDir, stderr: Path, timeout: float,
                 after: Callable[[], None] | None = None, agent: Path | None = None,
                 macs: Mapping[str, str] | None = None) -> Loader:
    """Load ``snap``'s state through an fd; QEMU's refusal becomes a one-line LaunchError.

    With ``agent`` (the guest agent's socket), once the guest runs its wall clock is
    set to now and each NIC with a MAC in ``macs`` (saved MAC → new MAC) takes its new one.
    """
    async def load(monitor: Monitor) -> None:
        t0 = time.monotonic()
        try:
            await _pump_in(monitor, snap.state_file, timeout)
        except (MonitorError, OSError) as exc:
            await asyncio.sleep(0.3)  # QEMU's last words reach its stderr log
            raise LaunchError(f"{snap.what}: QEMU could not load the saved state ({exc})",
                              stderr_tail=log_tail(stderr)) from exc
        log.info("%s loaded in %.3fs", snap.what, time.monotonic() - t0)
        await migration.announce(monitor)
        if after is not None:
            after()
        if agent is not None:
            task = asyncio.get_running_loop().create_task(
                _after_restore(GuestAgent(agent), monitor, dict(macs or {})))
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)

    return load


#: Clock and MAC setters running after a restore (kept referenced until done).
_BACKGROUND: set[asyncio.Task[None]] = set()


async def _after_restore(agent: GuestAgent, monitor: Monitor, macs: dict[str, str]) -> None:
    if await set_guest_clock(agent) and macs:
        await set_guest_macs(agent, monitor, macs)


async def set_guest_macs(agent: GuestAgent, monitor: Monitor, macs: dict[str, str]) -> None:
    """Give the guest's NICs their new MACs (a clone must not use its template's).

    The MAC is device state in the stream, so the clone's ``-device mac=`` does not
    reach the guest: the guest sets it (virtio-net changes it live), then announces it
    so the network (slirp, a bridge) learns it.
    """
    # Each NIC found by its saved MAC; the script fails if a change fails (e1000: not live).
    script = "; ".join(
        f'for d in /sys/class/net/*; do if [ "$(cat $d/address)" = "{old}" ]; then '
        f'ip link set dev "${{d##*/}}" address {new} || exit 1; fi; done'
        for old, new in macs.items())
    try:
        pid = await agent.exec(["/bin/sh", "-c", script], capture=True)
        for _ in range(40):
            status = await agent.exec_status(pid)
            if status.exited:
                if status.exit_code:
                    log.warning("the restored guest kept its template's MAC: %s",
                                status.stderr.decode(errors="replace").strip()[:200])
                break
            await asyncio.sleep(0.1)
    except MonitorError as exc:
        log.warning("the restored guest's MACs were not changed: %s", exc)
        return
    await migration.announce(monitor)


async def set_guest_clock(agent: GuestAgent, attempts: int = 40) -> bool:
    """Set the guest's wall clock to now, through its agent, once the guest runs again.

    A restored guest's clock resumes at the time the state was saved. Best effort: a
    guest without an answering agent keeps its clock (an NTP client fixes it too).
    True once the agent answered.
    """
    for _ in range(attempts):
        await asyncio.sleep(0.25)
        try:
            await agent.call("guest-set-time", {"time": time.time_ns()}, timeout=2)
        except MonitorError as exc:
            if "hwclock" in str(exc):
                return True  # the system clock is set; only the RTC write-back failed
            continue
        return True
    log.info("guest clock not set after the restore: the agent did not answer")
    return False


async def _pump_in(monitor: Monitor, path: Path, timeout: float) -> None:
    """Feed the state file to QEMU through a socketpair.

    QEMU 7.2 reads an incoming stream from a plain file fd at ~70 MiB/s here, from a
    socket at several hundred: vmdriver reads the file (``sendfile``) into the socket.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await migration.start_incoming(monitor, theirs.fileno())
        theirs.close()
        pump = asyncio.ensure_future(asyncio.to_thread(_send_file, path, ours))
        try:
            await migration.wait_incoming(monitor, timeout=timeout)
        except BaseException:
            # QEMU gave up (or exited): end the pump's sendfile with EPIPE, report QEMU's error.
            with contextlib.suppress(OSError):
                ours.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(Exception):
                await pump
            raise
        await pump
    finally:
        theirs.close()
        ours.close()


def _send_file(path: Path, sock: socket.socket) -> None:
    with path.open("rb") as f:
        sock.sendfile(f)
    sock.shutdown(socket.SHUT_WR)


def log_tail(path: Path) -> str:
    """The end of QEMU's stderr log (its reason for exiting)."""
    with contextlib.suppress(OSError), path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 2000))
        return f.read().decode(errors="replace")
    return ""
