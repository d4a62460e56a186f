"""Watching the runner's config file, the way Kubernetes updates it.

A ConfigMap volume never rewrites ``config.yaml``: the kubelet writes a new hidden
directory, points the ``..data`` symlink at it with a rename, and ``config.yaml`` is a
symlink through ``..data``. Editors replace files by rename too. So the *directory*
is watched (inotify: writes closed, entries moved in or created), and after a short
quiet time the file is read again; only a content change is reported, as a new
config or, for a bad edit, the error (the runner then keeps the config it runs with).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from asyncinotify import Inotify, Mask

from vmdriver.errors import SpecError
from vmdriver.runner.config import RunnerConfig, load_config

log = logging.getLogger(__name__)

#: Seconds without events before the file is read (a kubelet update is several renames).
DEBOUNCE_S = 0.2
_MASK = Mask.CLOSE_WRITE | Mask.MOVED_TO | Mask.CREATE | Mask.DELETE_SELF | Mask.MOVE_SELF


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None  # mid-swap, or deleted: wait for the next event


async def watch_config(path: Path, *, debounce: float = DEBOUNCE_S
                       ) -> AsyncIterator[RunnerConfig | SpecError]:
    """Yield the config each time ``path``'s content changes (the current one is not yielded)."""
    last = _digest(path)
    with Inotify() as inotify:
        inotify.add_watch(path.parent, _MASK)
        while True:
            await inotify.get()
            # Drain the burst: a ConfigMap update is a create, a symlink and a rename.
            while True:
                try:
                    await asyncio.wait_for(inotify.get(), debounce)
                except TimeoutError:
                    break
            digest = _digest(path)
            if digest is None or digest == last:
                continue
            last = digest
            update: RunnerConfig | SpecError
            try:
                update = load_config(path)
            except SpecError as exc:
                update = exc
            if isinstance(update, SpecError):
                # One line, no traceback: a typo in a ConfigMap is not a crash.
                log.error("config change not applied: %s", update)
            yield update
