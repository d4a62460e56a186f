"""The floor: the same QEMU argv launched by a minimal harness, no supervisor.

A :class:`BareVM` does only what any launcher must: fork/exec QEMU with a QMP
monitor on a pre-connected socketpair, read the greeting, ``qmp_capabilities``,
``cont``. Exit is observed through a pidfd, the serial console (for boot runs)
through a pipe, so nothing here polls. Whatever vmdriver adds on top of this is
its overhead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


class BareVM:
    """One QEMU process under the minimal harness."""

    def __init__(self, argv: tuple[str, ...], qmp: socket.socket, theirs: socket.socket,
                 fds: tuple[int, ...] = ()) -> None:
        self.argv = argv
        #: Other fds the argv names (image fds for ``-add-fd``); closed here once QEMU has them.
        self._fds = fds
        self._qmp = qmp
        self._theirs = theirs
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._console: asyncio.StreamReader | None = None
        self._console_lines: asyncio.Queue[str] | None = None
        self._drain: asyncio.Task[None] | None = None
        self._pidfd = -1
        self._exit: asyncio.Future[float] | None = None
        #: QMP events seen, with QEMU's own timestamps.
        self.events: list[dict[str, Any]] = []

    @staticmethod
    def socketpair() -> tuple[socket.socket, socket.socket]:
        """The QMP channel: our end, and the end QEMU inherits (its fd goes into the argv)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.set_inheritable(True)
        return ours, theirs

    @property
    def pid(self) -> int:
        """QEMU's pid."""
        assert self._proc is not None
        return self._proc.pid

    def spawn(self, *, cwd: Path, console: bool = False) -> None:
        """fork/exec QEMU; ``console`` pipes its stdout (the serial console) to us."""
        self._proc = subprocess.Popen(
            self.argv, cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if console else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, pass_fds=(self._theirs.fileno(), *self._fds),
        )
        self._theirs.close()
        self._close_fds()
        self._pidfd = os.pidfd_open(self._proc.pid)

    async def connect(self) -> None:
        """Greeting, ``qmp_capabilities``, ``cont``: the VM is running when this returns."""
        loop = asyncio.get_running_loop()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=self._qmp)
        if self._proc is not None and self._proc.stdout is not None:
            reader = asyncio.StreamReader(limit=1 << 20)
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), self._proc.stdout)
            self._console = reader
        await self._reader.readline()
        await self.execute("qmp_capabilities")
        await self.execute("cont")

    async def execute(self, cmd: str) -> Any:
        """One QMP command; events read on the way are kept."""
        assert self._reader is not None and self._writer is not None
        self._writer.write(json.dumps({"execute": cmd}).encode() + b"\n")
        while True:
            msg = await self._read()
            if "return" in msg or "error" in msg:
                return msg.get("return", msg.get("error"))

    async def _read(self) -> dict[str, Any]:
        assert self._reader is not None
        line = await self._reader.readline()
        if not line:
            raise EOFError("QMP closed")
        msg: dict[str, Any] = json.loads(line)
        if "event" in msg:
            self.events.append(msg)
        return msg

    async def wait_event(self, name: str) -> float:
        """Read QMP until event ``name``; QEMU's own timestamp of it (Unix seconds)."""
        for ev in self.events:
            if ev["event"] == name:
                return _stamp(ev)
        while True:
            msg = await self._read()
            if msg.get("event") == name:
                return _stamp(msg)

    async def wait_line(self, needle: str) -> float:
        """Read the console pipe until a line holds ``needle``; ``time.perf_counter()`` then."""
        assert self._console is not None
        while True:
            line = await self._console.readline()
            if not line:
                raise EOFError("console closed before the line appeared")
            if needle.encode() in line:
                now = time.perf_counter()
                # Keep draining so QEMU never blocks on a full pipe.
                self._drain = asyncio.create_task(self._drain_console())
                return now

    async def _drain_console(self) -> None:
        assert self._console is not None
        while await self._console.read(65536):
            pass

    def wait(self) -> asyncio.Future[float]:
        """A future of ``time.time()`` when the process exit is seen (and reaped)."""
        if self._exit is None:
            loop = asyncio.get_running_loop()
            self._exit = loop.create_future()
            loop.add_reader(self._pidfd, self._on_exit)
        return self._exit

    def _on_exit(self) -> None:
        now = time.time()
        asyncio.get_running_loop().remove_reader(self._pidfd)
        assert self._proc is not None
        self._proc.wait()
        assert self._exit is not None
        if not self._exit.done():
            self._exit.set_result(now)

    def kill(self) -> None:
        """SIGKILL."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    async def close(self) -> None:
        """Kill if still running and release everything."""
        self.kill()
        if self._proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait(), 10)
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._drain
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        self._qmp.close()
        self._theirs.close()
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = ()


def _stamp(event: dict[str, Any]) -> float:
    ts = event.get("timestamp", {})
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
