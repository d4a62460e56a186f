"""The supervisor's source of log writers: one small server process that forks them.

A VM's log writer (:mod:`vmdriver.runtime.logwriter`) is a process of the VM's
own: recorded with pid and start time, stopped after QEMU, logging on while no
supervisor runs. Starting one per VM cost an interpreter start-up (~15 ms of CPU)
in every launch; a burst of 32 launches took 1.6x bare QEMU's time with it,
1.1x without any writer. Here one server per supervisor (``logwriter.py --serve``)
starts once and forks a writer per request, which costs about a millisecond.

Requests are pipelined: each is sent at once on a ``SOCK_SEQPACKET`` socket (the
pipes' read ends attached) and its reply, which comes back in order, is matched
to it by one reader in the event loop. A burst of launches never queues behind
other launches' round trips. A server that died or stopped answering is
replaced once; the writers it forked carry on without it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import socket
import sys
import weakref
from collections.abc import Mapping
from pathlib import Path

from vmdriver.errors import LaunchError
from vmdriver.runtime import logwriter
from vmdriver.runtime.process import ManagedProcess, process_start_time

#: How long the server gets to answer a request (the first: its start-up as well).
REPLY_TIMEOUT_S = 10.0
#: How long the server gets to exit once closed.
EXIT_TIMEOUT_S = 2.0


def _forget(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    if sock.fileno() >= 0 and not loop.is_closed():
        with contextlib.suppress(RuntimeError, ValueError):
            loop.remove_reader(sock.fileno())
    sock.close()


def server_argv(control_fd: int) -> tuple[str, ...]:
    """The writer's file run as a script: ``-I`` (no ``PYTHON*`` variables, no user
    site) and ``-S`` (no site: it needs nothing installed)."""
    return (sys.executable, "-I", "-S", str(Path(logwriter.__file__).resolve()),
            "--serve", str(control_fd))


def request(max_bytes: int, streams: Mapping[int, Path], log_path: Path) -> bytes:
    """A writer request; the server takes absolute paths only. ``streams``' fds go
    alongside, in order."""
    return json.dumps({"max": max_bytes, "log": str(log_path.absolute()),
                       "streams": [[i, str(p.absolute())] for i, p in enumerate(streams.values())]
                       }).encode()


class WriterServer:
    """Forks log writers on request; started at the first one."""

    def __init__(self) -> None:
        self._proc: ManagedProcess | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Closes the socket: at close(), or when a supervisor is dropped without it
        #: (the server then ends at EOF too; and no ResourceWarning).
        self._forget: weakref.finalize[[asyncio.AbstractEventLoop, socket.socket], WriterServer] | None = None
        #: Replies come back in the order of the requests: one future each, oldest first.
        self._pending: collections.deque[asyncio.Future[bytes]] = collections.deque()

    async def writer(self, max_bytes: int, streams: Mapping[int, Path],
                     log_path: Path) -> ManagedProcess:
        """A new writer of the pipes' read ends in ``streams`` (which stay ours to close)."""
        for attempt in range(2):
            try:
                return await self._ask(request(max_bytes, streams, log_path), list(streams),
                                       log_path)
            except (OSError, TimeoutError, ValueError) as exc:
                await self.close()
                if attempt:
                    raise LaunchError(f"cannot start the log writer: {exc}") from None
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Let the server end (it exits at EOF on its socket)."""
        proc, forget = self._proc, self._forget
        self._sock = self._proc = self._loop = self._forget = None
        self._fail(ConnectionResetError("the log writers' server was closed"))
        if forget is not None:
            forget()
        if proc is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), EXIT_TIMEOUT_S)
        except TimeoutError:
            proc.kill_group()
            await asyncio.wait_for(proc.wait(), EXIT_TIMEOUT_S)
        finally:
            proc.close()

    async def _ask(self, req: bytes, fds: list[int], log_path: Path) -> ManagedProcess:
        sock = await self._ensure()
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending.append(reply)
        try:
            socket.send_fds(sock, [req], fds)
        except OSError:
            self._pending.remove(reply)
            raise
        answer = json.loads(await asyncio.wait_for(reply, REPLY_TIMEOUT_S))
        if "error" in answer:
            raise LaunchError(f"cannot start the log writer: {answer['error']}")
        pid = int(answer["pid"])
        start = process_start_time(pid)
        if start is None:
            raise LaunchError(f"the log writer exited as it started; see {log_path}")
        return ManagedProcess(pid, start, child=False)

    async def _ensure(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        if self._sock is not None and self._loop is not loop:
            await self.close()  # a server watched by another (finished) event loop
        if self._sock is not None:
            return self._sock
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            theirs.set_inheritable(True)
            # Spawned in-line, not in a thread: the next request must find the socket.
            self._proc = ManagedProcess.spawn(
                server_argv(theirs.fileno()), cwd=Path("/"), env={},
                stdout=Path(os.devnull), stderr=Path(os.devnull), pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock, self._loop = ours, loop
        loop.add_reader(ours.fileno(), self._on_readable)
        self._forget = weakref.finalize(self, _forget, loop, ours)
        return ours

    def _on_readable(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(exc)
                return
            if not data:
                self._fail(ConnectionResetError("the log writers' server exited"))
                assert self._loop is not None
                self._loop.remove_reader(sock.fileno())
                return
            if self._pending:
                reply = self._pending.popleft()
                if not reply.done():  # else its caller gave up waiting
                    reply.set_result(data)

    def _fail(self, exc: BaseException) -> None:
        while self._pending:
            reply = self._pending.popleft()
            if not reply.done():
                reply.set_exception(exc)
