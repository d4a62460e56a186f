"""One run loop for the faces that own their VMs in the foreground (`vmdriver run`, the runner).

Start every VM (all are checked before any starts), then wait until they have
all ended. The first SIGINT/SIGTERM stops them all with their shutdown ladders
at once; a second one kills them. Whatever happens, nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmdriver.runtime.request import LaunchRequest
from vmdriver.runtime.state import ExitResult
from vmdriver.runtime.supervisor import Supervisor, VMInfo

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class RunHooks:
    """What a face wants to hear while the loop runs (all optional)."""

    #: A VM runs: its request, what the supervisor says of it, seconds since the start.
    started: Callable[[LaunchRequest, VMInfo, float], None] | None = None
    #: The first signal arrived: every VM is being stopped.
    stopping: Callable[[], None] | None = None
    #: Another signal arrived: every VM is being killed.
    killing: Callable[[], None] | None = None


@dataclass(frozen=True)
class RunOutcome:
    """How each started VM ended, in request order."""

    results: list[tuple[LaunchRequest, ExitResult]]

    @property
    def successful(self) -> bool:
        """True when every VM ended the way a user wanted."""
        return all(res.successful for _, res in self.results)


class _Signals:
    """SIGINT/SIGTERM turned into a stop, then a kill."""

    def __init__(self, sup: Supervisor, hooks: RunHooks) -> None:
        self.sup, self.hooks = sup, hooks
        self.stop_requested = asyncio.Event()
        self.presses = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self) -> None:
        self.presses += 1
        if self.presses == 1:
            if self.hooks.stopping:
                self.hooks.stopping()
            self.stop_requested.set()
            return
        if self.hooks.killing:
            self.hooks.killing()
        task = asyncio.get_running_loop().create_task(self.sup.kill_all())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def run_vms(sup: Supervisor, reqs: list[LaunchRequest],
                  hooks: RunHooks | None = None) -> RunOutcome:
    """Run ``reqs`` until every VM has ended; see the module docstring."""
    hooks = hooks or RunHooks()
    loop = asyncio.get_running_loop()
    on_signal = _Signals(sup, hooks)
    for sig in _SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    started: list[LaunchRequest] = []
    try:
        t0 = time.monotonic()
        infos = await sup.start_many(reqs) if not on_signal.stop_requested.is_set() else []
        for req, info in zip(reqs, infos, strict=False):
            started.append(req)
            if hooks.started:
                hooks.started(req, info, time.monotonic() - t0)
        await _wait_or_stop(sup, [r.vm_id for r in started], on_signal.stop_requested)
        return RunOutcome([(r, await sup.wait(r.vm_id)) for r in started])
    finally:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)
        # An error or a cancel on the way: leave nothing running.
        with contextlib.suppress(Exception):
            await sup.kill_all()
        await sup.close()


async def _wait_or_stop(sup: Supervisor, ids: list[str], stop: asyncio.Event) -> None:
    waits: asyncio.Future[Any] = asyncio.gather(*(sup.wait(i) for i in ids))
    stopper: asyncio.Future[Any] = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([waits, stopper], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            await sup.stop_all()
        await waits
    finally:
        stopper.cancel()
