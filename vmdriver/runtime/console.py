"""Following a VM's serial console log as it grows.

QEMU writes the console straight into a file (or Nomad's FIFO), so the guest
keeps its console when no supervisor is watching; readers tail the file.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

POLL_S = 0.02


async def follow(path: Path, *, from_start: bool = True, poll: float = POLL_S) -> AsyncIterator[str]:
    """Yield complete lines appended to ``path``, forever (cancel to stop)."""
    # QEMU (another process) creates and grows the file: there is no event to await short
    # of inotify, so poll as `tail -f` does; a stat of a local file does not block.
    while not path.exists():  # noqa: ASYNC110, ASYNC240
        await asyncio.sleep(poll)
    with path.open("rb") as f:
        if not from_start:
            f.seek(0, 2)
        partial = b""
        while True:
            chunk = f.read(65536)
            if not chunk:
                await asyncio.sleep(poll)
                continue
            partial += chunk
            *lines, partial = partial.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r").decode(errors="replace")


async def wait_for_line(path: Path, pattern: str, timeout: float) -> str:
    """The first line of ``path`` matching the regex ``pattern``; TimeoutError after ``timeout``."""
    regex = re.compile(pattern)

    async def scan() -> str:
        async for line in follow(path):
            if regex.search(line):
                return line
        raise AssertionError("unreachable")

    return await asyncio.wait_for(scan(), timeout)
