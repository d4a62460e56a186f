"""Following a VM's serial console log as it grows.

The VM's log writer (or QEMU, for Nomad's FIFO) appends the console to a file, so
the guest keeps its console when no supervisor is watching; readers tail the file.
The writer rotates it (``.0`` renamed to ``.1``, a new ``.0``): a reader at the end
of the old file moves on to the new one. A reader that falls a whole file behind
loses those lines, never yields part of one.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncGenerator
from pathlib import Path

POLL_S = 0.02


async def follow(path: Path, *, from_start: bool = True, poll: float = POLL_S) -> AsyncGenerator[str, None]:
    """Yield complete lines appended to ``path``, forever (cancel to stop)."""
    # QEMU (another process) creates and grows the file: there is no event to await short
    # of inotify, so poll as `tail -f` does; a stat of a local file does not block.
    while not path.exists():  # noqa: ASYNC110, ASYNC240
        await asyncio.sleep(poll)
    f = path.open("rb")
    try:
        if not from_start:
            f.seek(0, 2)
        partial = b""
        resync = False
        while True:
            chunk = f.read(65536)
            if not chunk and _replaced(path, f.fileno()):
                # What was written before the rename, then on to the new file.
                chunk = f.read()
                if not chunk:
                    if os.fstat(f.fileno()).st_nlink == 0:
                        # Rotated away twice while we slept: a whole file was missed, and
                        # the new one may begin with the end of a line we never saw.
                        # Lose whole lines rather than yield a fragment.
                        partial, resync = b"", True
                    f.close()
                    f = path.open("rb")
                    continue
            if not chunk:
                await asyncio.sleep(poll)
                continue
            if resync:
                start = chunk.find(b"\n") + 1
                if not start:
                    continue
                chunk, resync = chunk[start:], False
            partial += chunk
            *lines, partial = partial.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r").decode(errors="replace")
    finally:
        f.close()


def _replaced(path: Path, fd: int) -> bool:
    """True once ``path`` names another file than the open ``fd`` (it was rotated)."""
    try:
        return path.stat().st_ino != os.fstat(fd).st_ino
    except FileNotFoundError:
        return False  # between the rename and the new file: look again later


async def wait_for_line(path: Path, pattern: str, timeout: float) -> str:
    """The first line of ``path`` matching the regex ``pattern``; TimeoutError after ``timeout``."""
    regex = re.compile(pattern)

    async def scan() -> str:
        async for line in follow(path):
            if regex.search(line):
                return line
        raise AssertionError("unreachable")

    return await asyncio.wait_for(scan(), timeout)
