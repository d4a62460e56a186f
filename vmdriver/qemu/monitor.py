"""A QMP monitor connection, on top of the QEMU project's ``qemu.qmp`` library.

This layer only maps ``qemu.qmp``'s exceptions to :class:`MonitorError` and
gives the supervisor the few operations it needs; cancellation passes through
untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError, Runstate

from vmdriver.errors import MonitorError

log = logging.getLogger(__name__)

#: The QMP events the supervisor acts on.
LIFECYCLE_EVENTS = ("SHUTDOWN", "POWERDOWN", "GUEST_PANICKED", "STOP", "RESUME", "RESET")


class Monitor:
    """One QMP session with one QEMU process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._client = QMPClient(name)
        # qemu.qmp logs every disconnect at error level; the supervisor reports exits itself.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL + 1)

    async def connect(self, target: socket.socket | Path, timeout: float = 10.0) -> None:
        """Open the session over an inherited socket or a unix socket path."""
        address: socket.socket | str = target if isinstance(target, socket.socket) else str(target)
        try:
            await asyncio.wait_for(self._client.connect(address), timeout)
        except (ConnectError, QMPError, OSError, TimeoutError) as exc:
            raise MonitorError(f"QMP connect to {self.name} failed: {exc}") from exc

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Run one QMP command and return its ``return`` value."""
        try:
            return await asyncio.wait_for(self._client.execute(cmd, args), timeout)
        except ExecuteError as exc:
            raise MonitorError(f"QMP {cmd} on {self.name}: {exc.error.error.desc}") from exc
        except (QMPError, OSError, TimeoutError) as exc:
            raise MonitorError(f"QMP {cmd} on {self.name}: {exc or type(exc).__name__}") from exc

    async def execute_with_fd(self, cmd: str, args: dict[str, Any], fd: int,
                              timeout: float = 10.0) -> Any:
        """Send ``fd`` over the socket (SCM_RIGHTS), then run ``cmd`` that takes it
        (``getfd``, ``add-fd``): QEMU uses a file vmdriver opened, under ``-sandbox``."""
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError, AssertionError) as exc:
            raise MonitorError(f"QMP {cmd} on {self.name}: cannot pass the fd: {exc}") from exc
        return await self.execute(cmd, args, timeout)

    async def add_fd(self, fd: int, opaque: str | None = None) -> int:
        """Hand QEMU ``fd`` in a new fd set (``add-fd``); its id, for ``/dev/fdset/N``.

        QEMU keeps its own copy: the caller closes ``fd``. ``remove-fd`` with the id
        releases the set once nothing in QEMU uses it any more.
        """
        args = {"opaque": opaque} if opaque else {}
        reply = await self.execute_with_fd("add-fd", args, fd)
        try:
            return int(reply["fdset-id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MonitorError(f"QMP add-fd on {self.name}: unexpected reply {reply!r}") from exc

    @contextlib.asynccontextmanager
    async def events(self, *names: str) -> AsyncIterator[EventListener]:
        """A listener for the named events (all events if none are named)."""
        listener = EventListener(names or None)
        with self._client.listen(listener):
            yield listener

    async def disconnect(self) -> None:
        """Close the session; errors of a session already broken are not news."""
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()

    async def wait_closed(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the session to end (QEMU closing its side)."""
        async def closed() -> None:
            while self._client.runstate == Runstate.RUNNING:
                await self._client.runstate_changed()

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closed(), timeout)

    @property
    def connected(self) -> bool:
        """True while the session runs."""
        return bool(self._client.runstate == Runstate.RUNNING)
