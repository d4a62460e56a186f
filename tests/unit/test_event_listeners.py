"""Who gets a VM's QMP events (:mod:`vmdriver.runtime.events`), as pure logic: the
real events through a real QEMU are in ``tests/e2e/test_hooks.py``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from vmdriver.runtime.events import EventStream, Listeners


def ev(name: str) -> dict[str, Any]:
    return {"event": name, "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}}


def test_a_listener_that_raises_is_dropped_and_the_others_still_get_events(
        caplog: pytest.LogCaptureFixture) -> None:
    listeners, seen, calls = Listeners("VM t"), [], []

    def failing(event: dict[str, Any]) -> None:
        calls.append(event["event"])
        raise ValueError("bug")

    listeners.add(failing)
    listeners.add(lambda event: seen.append(event["event"]))
    listeners.emit(ev("STOP"))
    listeners.emit(ev("RESUME"))
    assert (calls, seen) == (["STOP"], ["STOP", "RESUME"])
    assert "VM t: dropping an event listener that failed" in caplog.text


def test_unsubscribe_stops_delivery_and_may_be_called_twice() -> None:
    listeners, seen = Listeners("VM t"), []
    unsubscribe = listeners.add(lambda event: seen.append(event["event"]))
    listeners.emit(ev("STOP"))
    unsubscribe()
    unsubscribe()
    listeners.emit(ev("RESUME"))
    assert seen == ["STOP"]


def test_close_tells_listeners_once_and_later_ones_at_once() -> None:
    listeners, ends, seen = Listeners("VM t"), [], list[dict[str, Any]]()
    listeners.add(seen.append, lambda: ends.append("early"))
    listeners.close()
    listeners.emit(ev("STOP"))  # the watcher is done: nobody hears of it
    listeners.add(seen.append, lambda: ends.append("late"))
    assert (ends, seen) == (["early", "late"], [])


def test_stream_keeps_the_named_events_and_ends_after_those_queued() -> None:
    async def main() -> list[str]:
        stream = EventStream(("STOP", "RESUME"))
        for name in ("STOP", "BALLOON_CHANGE", "RESUME"):
            stream.put(ev(name))
        stream.end()
        got = [event["event"] async for event in stream]
        assert await anext(stream, None) is None  # stays ended
        return got

    assert asyncio.run(main()) == ["STOP", "RESUME"]
