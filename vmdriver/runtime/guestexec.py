"""Commands run in the guest through its agent, with their output streamed as it comes.

qemu-ga's ``guest-exec`` hands back captured output only once the command has
ended, and ``guest-exec-status`` answers with it exactly once (a second call, or
a reply lost on the way, and the output and exit code are gone). So the command
runs with its stdio on files in a private guest dir, and the host tails them
with ``guest-file-read`` while it runs:

- ``D/out`` and ``D/err`` are regular files the command writes and the agent
  reads at its position (qemu-ga 7.2 reads on after an EOF: measured);
- ``D/in`` is a FIFO the agent holds open read-write (``r+``: opening a FIFO that
  way never blocks, and qemu-ga makes the fd non-blocking), so the command's
  ``<D/in`` does not wait and sees EOF when the agent closes it. Writes go in
  pieces of at most ``PIPE_BUF`` (4096) bytes: on a full pipe such a write fails
  whole (EAGAIN) and is retried, so nothing is written twice (270 kB through
  ``md5sum`` on the test guest matched).

The command is started as ``exec setsid CMD`` so the pid the agent returns is
the command's own and its exit code and signal are real; on a timeout its whole
session is killed. Every step is an agent call of its own; the agent serialises
them per socket.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass

from vmdriver.errors import InputError, MonitorError
from vmdriver.qemu.agent import ExecStatus, GuestAgent

log = logging.getLogger(__name__)

#: Largest write that a non-blocking pipe takes whole or not at all.
PIPE_BUF = 4096
#: Bytes asked for per ``guest-file-read``.
READ_CHUNK = 65536
#: Poll interval while output flows, and the longest one while the command is quiet.
POLL_MIN_S, POLL_MAX_S = 0.05, 0.5
#: How long the agent may take to answer its first ping.
PING_TIMEOUT_S = 3.0
#: ``timeout(1)``'s exit code, for a command vmdriver killed at its deadline.
TIMEOUT_EXIT_CODE = 124
#: The guest-side helper: a private dir with the stdio files, then the command in a
#: session of its own (so a timeout kills its children too) where setsid exists.
_SETUP = ('umask 077; d="$1"; mkdir "$d" && : >"$d/out" && : >"$d/err" || exit 125; '
          '[ "$2" = fifo ] && { mkfifo "$d/in" || exit 125; }; exit 0')
_RUN = ('d="$1"; shift; i=/dev/null; [ -p "$d/in" ] && i="$d/in"; '
        'if command -v setsid >/dev/null 2>&1; then exec setsid "$@" <"$i" >"$d/out" 2>"$d/err"; '
        'fi; exec "$@" <"$i" >"$d/out" 2>"$d/err"')

#: Where output goes: ``on_output("stdout" | "stderr", data)``.
OutputSink = Callable[[str, bytes], None]


@dataclass(frozen=True)
class ExecResult:
    """How a guest command ended."""

    exit_code: int
    #: Signal that ended it (0 if none).
    signal: int = 0
    #: vmdriver killed it at its deadline (``exit_code`` is then 124).
    timed_out: bool = False


@dataclass(frozen=True)
class Captured:
    """A command's result and all its output (Nomad's ExecTask, script checks)."""

    result: ExecResult
    stdout: bytes
    stderr: bytes


async def require_agent(agent: GuestAgent, what: str) -> None:
    """Raise a clear :class:`MonitorError` unless the agent answers a ping now."""
    if not await agent.ping(PING_TIMEOUT_S):
        raise MonitorError(f"{what}: the guest agent does not answer on {agent.path} "
                           f"(is qemu-ga running in the guest?)")


async def _wait_exited(agent: GuestAgent, pid: int, timeout: float) -> ExecStatus:
    deadline = time.monotonic() + timeout
    while True:
        st = await agent.exec_status(pid)
        if st.exited:
            return st
        if time.monotonic() > deadline:
            raise MonitorError(f"guest agent: helper pid {pid} still runs after {timeout:g}s")
        await asyncio.sleep(0.02)


class GuestProcess:
    """One command in the guest; see the module docstring. Use :func:`run`."""

    def __init__(self, agent: GuestAgent, argv: Sequence[str], *,
                 env: Mapping[str, str] | None = None, with_stdin: bool = False) -> None:
        if not argv or not argv[0]:
            raise InputError("no command given", where="exec")
        self.agent, self.argv, self.env, self.with_stdin = agent, list(argv), env, with_stdin
        self.dir = f"/tmp/.vmdriver-exec-{secrets.token_hex(6)}"
        self.pid = 0
        self._handles: dict[str, int] = {}
        self._stdin_closed = not with_stdin

    async def start(self) -> None:
        """Make the guest dir, open its files, start the command."""
        setup = await self.agent.exec(["/bin/sh", "-c", _SETUP, "sh", self.dir,
                                       "fifo" if self.with_stdin else "none"])
        st = await _wait_exited(self.agent, setup, 10.0)
        if st.exit_code != 0:
            raise MonitorError(f"guest agent: cannot make {self.dir} in the guest "
                               f"(exit code {st.exit_code}): {st.stderr.decode(errors='replace')}")
        for name, mode in (("out", "r"), ("err", "r")) + ((("in", "r+"),) if self.with_stdin else ()):
            self._handles[name] = int(await self.agent.call(
                "guest-file-open", {"path": f"{self.dir}/{name}", "mode": mode}))
        self.pid = await self.agent.exec(["/bin/sh", "-c", _RUN, "sh", self.dir, *self.argv],
                                         env=_with_path(self.env), capture=False)

    async def write(self, data: bytes) -> None:
        """Feed the command's stdin; waits while the pipe is full."""
        handle = self._handles.get("in")
        if handle is None or self._stdin_closed:
            return
        for off in range(0, len(data), PIPE_BUF):
            chunk = base64.b64encode(data[off:off + PIPE_BUF]).decode()
            while True:
                try:
                    await self.agent.call("guest-file-write", {"handle": handle, "buf-b64": chunk})
                    await self.agent.call("guest-file-flush", {"handle": handle})
                    break
                except MonitorError as exc:
                    if "temporarily unavailable" not in str(exc):
                        raise
                    await asyncio.sleep(POLL_MIN_S)  # the pipe is full: the command reads on

    async def close_stdin(self) -> None:
        """EOF on the command's stdin (the agent holds the FIFO's only write end)."""
        if not self._stdin_closed:
            self._stdin_closed = True
            await self.agent.call("guest-file-close", {"handle": self._handles.pop("in")})

    async def read(self, name: str, *, rewind: bool = False) -> bytes:
        """What ``out``/``err`` gained since the last read."""
        handle = self._handles[name]
        if rewind:
            # An fseek clears a sticky EOF, should a guest's libc keep one.
            await self.agent.call("guest-file-seek", {"handle": handle, "offset": 0,
                                                      "whence": "cur"})
        out = b""
        while True:
            got = await self.agent.call("guest-file-read", {"handle": handle, "count": READ_CHUNK})
            out += base64.b64decode(got.get("buf-b64", ""))
            if int(got.get("count", 0)) < READ_CHUNK:
                return out

    async def kill(self) -> None:
        """SIGKILL the command's session (and the command, if it has none)."""
        script = f"kill -KILL -{self.pid} 2>/dev/null; kill -KILL {self.pid} 2>/dev/null; exit 0"
        with contextlib.suppress(MonitorError):
            await _wait_exited(self.agent, await self.agent.exec(["/bin/sh", "-c", script]), 5.0)

    async def cleanup(self) -> None:
        """Close the handles and remove the guest dir; best effort (the VM may be gone)."""
        for handle in list(self._handles.values()):
            with contextlib.suppress(MonitorError):
                await self.agent.call("guest-file-close", {"handle": handle})
        self._handles.clear()
        self._stdin_closed = True
        with contextlib.suppress(MonitorError):
            await self.agent.exec(["/bin/rm", "-rf", self.dir], capture=False)


def _with_path(env: Mapping[str, str] | None) -> dict[str, str] | None:
    """``guest-exec`` replaces the environment: keep a PATH so commands are found."""
    if not env:
        return None
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", **env}


async def _feed(proc: GuestProcess, stdin: AsyncIterator[bytes]) -> None:
    try:
        async for data in stdin:
            await proc.write(data)
    finally:
        with contextlib.suppress(MonitorError):
            await proc.close_stdin()


async def _pump(proc: GuestProcess, on_output: OutputSink, deadline: float | None) -> ExecResult:
    """Tail the output files until the command ends (or its deadline passes)."""
    interval = POLL_MIN_S
    while True:
        got = False
        for name, stream in (("out", "stdout"), ("err", "stderr")):
            if data := await proc.read(name):
                on_output(stream, data)
                got = True
        st = await proc.agent.exec_status(proc.pid)
        if st.exited:
            for name, stream in (("out", "stdout"), ("err", "stderr")):
                if data := await proc.read(name, rewind=True):
                    on_output(stream, data)
            return ExecResult(st.exit_code if st.exit_code is not None else 128 + (st.signal or 0),
                              st.signal or 0)
        if deadline is not None and time.monotonic() >= deadline:
            return ExecResult(TIMEOUT_EXIT_CODE, 0, timed_out=True)
        interval = POLL_MIN_S if got else min(POLL_MAX_S, interval * 1.5)
        await asyncio.sleep(interval)


async def _kill_and_reap(proc: GuestProcess) -> None:
    await proc.kill()
    with contextlib.suppress(MonitorError):
        await _wait_exited(proc.agent, proc.pid, 5.0)


async def run(agent: GuestAgent, argv: Sequence[str], on_output: OutputSink, *,
              stdin: AsyncIterator[bytes] | None = None, env: Mapping[str, str] | None = None,
              timeout: float | None = None) -> ExecResult:
    """Run ``argv`` in the guest, streaming its output to ``on_output`` as it comes.

    ``stdin`` (if given) is fed to the command until it ends; then the command sees
    EOF. Without ``stdin`` the command reads /dev/null. After ``timeout`` seconds
    the command's session is killed and the result says ``timed_out``.
    """
    proc = GuestProcess(agent, argv, env=env, with_stdin=stdin is not None)
    deadline = time.monotonic() + timeout if timeout else None
    feeder: asyncio.Task[None] | None = None
    ended = False
    try:
        await proc.start()
        if stdin is not None:
            feeder = asyncio.create_task(_feed(proc, stdin), name=f"stdin of guest pid {proc.pid}")
        result = await _pump(proc, on_output, deadline)
        ended = not result.timed_out
        if result.timed_out:
            await _kill_and_reap(proc)
            for name, stream in (("out", "stdout"), ("err", "stderr")):
                with contextlib.suppress(MonitorError):
                    if data := await proc.read(name, rewind=True):
                        on_output(stream, data)
        ended = True
        return result
    finally:
        if proc.pid and not ended:
            # Cancelled (the client went away) or the agent failed: leave nothing running.
            await asyncio.shield(_kill_and_reap(proc))
        if feeder is not None:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, MonitorError):
                await feeder
        await asyncio.shield(proc.cleanup())


async def capture(agent: GuestAgent, argv: Sequence[str], *, timeout: float | None = None,
                  env: Mapping[str, str] | None = None) -> Captured:
    """Run ``argv`` with no stdin and return all its output at the end."""
    out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
    result = await run(agent, argv, lambda s, d: out[s].extend(d), env=env, timeout=timeout)
    return Captured(result, bytes(out["stdout"]), bytes(out["stderr"]))
