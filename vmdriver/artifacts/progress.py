"""Progress of artifact fetches: events from the fetching thread, and two renderings:
a rich progress bar (bytes, rate, ETA) on a terminal, plain throttled lines otherwise."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

Phase = Literal["download", "copy", "unpack", "cached", "done"]


@dataclass(frozen=True)
class ProgressEvent:
    """Where one artifact stands. ``done``/``total`` are bytes of the current phase."""

    artifact: str
    phase: Phase
    done: int = 0
    total: int | None = None
    #: Set on the last event of a phase (or a one-off message such as ``cached``).
    finished: bool = False
    message: str = ""


#: What fetch_artifacts calls; it may be called from a worker thread.
ProgressCallback = Callable[[ProgressEvent], None]


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class PlainProgress:
    """One line per phase start and end, and at most one every ``interval`` seconds between."""

    def __init__(self, write: Callable[[str], None], interval: float = 5.0) -> None:
        self._write = write
        self._interval = interval
        self._lock = threading.Lock()
        self._started: dict[tuple[str, str], float] = {}
        self._last: dict[tuple[str, str], float] = {}

    def __call__(self, ev: ProgressEvent) -> None:
        key = (ev.artifact, ev.phase)
        now = time.monotonic()
        with self._lock:
            if ev.message:
                self._write(f"artifact {ev.artifact}: {ev.message}")
                return
            if key not in self._started:
                self._started[key] = self._last[key] = now
                size = f" {_mib(ev.total)}" if ev.total else ""
                if not ev.finished:
                    self._write(f"artifact {ev.artifact}: {ev.phase}{size} started")
                    return
            start = self._started[key]
            if not ev.finished and now - self._last[key] < self._interval:
                return
            self._last[key] = now
            rate = ev.done / max(now - start, 1e-6)
            of = f"/{_mib(ev.total)}" if ev.total else ""
            pct = f" ({100 * ev.done / ev.total:.0f}%)" if ev.total else ""
            tail = f" in {now - start:.1f}s" if ev.finished else f", {_mib(rate)}/s"
            verb = f"{ev.phase} done" if ev.finished else ev.phase
            self._write(f"artifact {ev.artifact}: {verb} {_mib(ev.done)}{of}{pct}{tail}")


class RichProgress:
    """A rich progress bar per artifact phase."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[tuple[str, str], TaskID] = {}

    def __call__(self, ev: ProgressEvent) -> None:
        if ev.message:
            self._progress.console.print(f"[bold cyan]vmdriver[/]: artifact {ev.artifact}: "
                                         f"{ev.message}", highlight=False, markup=True)
            return
        key = (ev.artifact, ev.phase)
        task = self._tasks.get(key)
        if task is None:
            name = ev.artifact.rsplit("/", 1)[-1][:40]
            task = self._progress.add_task(f"{ev.phase} {name}", total=ev.total)
            self._tasks[key] = task
        self._progress.update(task, completed=ev.done, total=ev.total)
        if ev.finished:
            self._progress.update(task, completed=ev.done, total=ev.done or 1)


@contextmanager
def progress_display(console: Console, *, prefix: str = "vmdriver: ") -> Iterator[ProgressCallback]:
    """A callback that renders on ``console``: bars on a terminal, plain lines otherwise."""
    if not console.is_terminal:
        yield PlainProgress(lambda line: console.print(f"{prefix}{line}", markup=False,
                                                       highlight=False))
        return
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
        TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )
    with bar:
        yield RichProgress(bar)
