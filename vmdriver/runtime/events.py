"""A VM's QMP events passed on to faces: listeners, and a stream built on one.

Events are dicts as ``qemu.qmp`` delivers them (``event``, ``data``,
``timestamp``). The VM's watcher calls every listener in turn from its event
reader, so a listener must not block; :class:`EventStream` queues events for a
task that waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Event = dict[str, Any]
Listener = Callable[[Event], None]


class Listeners:
    """Who gets one VM's events, until the VM ends."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._calls: list[tuple[Listener, Callable[[], None] | None]] = []
        self._closed = False

    def add(self, listener: Listener, on_end: Callable[[], None] | None = None) -> Callable[[], None]:
        """Call ``listener`` with each event from now on, and ``on_end`` once when the VM
        ends (at once if it has). Returns what unsubscribes (safe to call twice)."""
        entry = (listener, on_end)
        if self._closed:
            if on_end is not None:
                on_end()
            return lambda: None
        self._calls.append(entry)
        return lambda: self._drop(entry)

    def emit(self, event: Event) -> None:
        """Give ``event`` to every listener. One that raises is logged and dropped: a
        face's bug must not stop the watcher, which classifies the VM's exit."""
        for entry in list(self._calls):
            try:
                entry[0](event)
            except Exception:
                log.exception("%s: dropping an event listener that failed", self._owner)
                self._drop(entry)

    def close(self) -> None:
        """The VM ended: no more events; listeners are told and forgotten."""
        self._closed = True
        calls, self._calls = self._calls, []
        for _, on_end in calls:
            if on_end is not None:
                with contextlib.suppress(Exception):
                    on_end()

    def _drop(self, entry: tuple[Listener, Callable[[], None] | None]) -> None:
        with contextlib.suppress(ValueError):
            self._calls.remove(entry)


class EventStream:
    """The named events (all if none are named) of one VM as an async iterator, which
    ends when the VM does. Subscribed while it exists: events of the meantime wait."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self._names = frozenset(names)
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()

    def put(self, event: Event) -> None:
        """The listener: queue the events asked for."""
        if not self._names or event.get("event") in self._names:
            self._queue.put_nowait(event)

    def end(self) -> None:
        """The VM ended: the iteration stops after the events already queued."""
        self._queue.put_nowait(None)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        event = await self._queue.get()
        if event is None:
            self._queue.put_nowait(None)  # ended for good, however often it is asked
            raise StopAsyncIteration
        return event
