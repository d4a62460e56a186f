"""A client for the QEMU guest agent (qemu-ga) on a VM's agent socket.

The agent speaks QMP-style JSON lines but has no greeting and no capabilities
negotiation, and a client may inherit half an answer meant for an earlier one:
each session therefore starts with ``guest-sync-delimited``, whose answer is
preceded by a 0xFF byte that marks where the stream is clean again.

QEMU's chardev socket serves one client at a time, so every call opens its own
short session and calls are serialised per socket: other tools (an operator's
``socat``) get their turn between them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmdriver.errors import MonitorError

#: Seconds a call may take unless told otherwise (the guest may be busy booting).
CALL_TIMEOUT_S = 10.0
_LOCKS: dict[Path, asyncio.Lock] = {}


@dataclass(frozen=True)
class ExecStatus:
    """``guest-exec-status`` of a command run in the guest."""

    exited: bool
    exit_code: int | None = None
    signal: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    #: The agent cut the output at its buffer limit.
    truncated: bool = False


class GuestAgent:
    """The agent of one VM, reached through its socket."""

    def __init__(self, socket_path: Path) -> None:
        self.path = socket_path

    async def call(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                   timeout: float = CALL_TIMEOUT_S, expect_reply: bool = True) -> Any:
        """Run one agent command; its ``return`` value. MonitorError on any failure."""
        lock = _LOCKS.setdefault(self.path, asyncio.Lock())
        async with lock:
            try:
                return await asyncio.wait_for(self._session(command, arguments, expect_reply),
                                              timeout)
            except TimeoutError:
                raise MonitorError(f"guest agent: {command} got no answer within "
                                   f"{timeout:g}s (is qemu-ga running in the guest?)") from None
            except (OSError, ValueError, EOFError) as exc:
                raise MonitorError(f"guest agent: {command}: {exc}") from exc

    async def _session(self, command: str, arguments: Mapping[str, Any] | None,
                       expect_reply: bool) -> Any:
        reader, writer = await asyncio.open_unix_connection(str(self.path), limit=2**24)
        try:
            token = random.randrange(1, 2**31)
            await _send(writer, "guest-sync-delimited", {"id": token})
            await reader.readuntil(b"\xff")
            while (await _reply(reader, "guest-sync-delimited")) != token:
                pass  # a stale answer from an earlier client: read on to ours
            await _send(writer, command, arguments)
            return await _reply(reader, command) if expect_reply else None
        finally:
            writer.close()
            await writer.wait_closed()

    async def ping(self, timeout: float = 2.0) -> bool:
        """True if the agent answers now."""
        try:
            await self.call("guest-ping", timeout=timeout)
        except MonitorError:
            return False
        return True

    async def shutdown(self, mode: str = "powerdown") -> None:
        """Ask the guest OS to shut down (the agent sends no answer on success)."""
        await self.call("guest-shutdown", {"mode": mode}, expect_reply=False)

    async def exec(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   stdin: bytes | None = None, capture: bool = True) -> int:
        """Start ``argv`` in the guest; its pid there."""
        args: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": capture}
        if env:
            args["env"] = [f"{k}={v}" for k, v in env.items()]
        if stdin:
            args["input-data"] = base64.b64encode(stdin).decode()
        reply = await self.call("guest-exec", args)
        return int(reply["pid"])

    async def exec_status(self, pid: int) -> ExecStatus:
        """Whether a command started by :meth:`exec` ended, and its output so far."""
        r = await self.call("guest-exec-status", {"pid": pid})
        return ExecStatus(
            exited=bool(r.get("exited")), exit_code=r.get("exitcode"), signal=r.get("signal"),
            stdout=base64.b64decode(r.get("out-data", "")),
            stderr=base64.b64decode(r.get("err-data", "")),
            truncated=bool(r.get("out-truncated") or r.get("err-truncated")),
        )

    async def read_file(self, path: str, limit: int = 1 << 20) -> bytes:
        """A guest file's content (up to ``limit`` bytes), through the agent's file calls."""
        handle = await self.call("guest-file-open", {"path": path, "mode": "r"})
        try:
            out = b""
            while len(out) < limit:
                got = await self.call("guest-file-read", {"handle": handle,
                                                          "count": min(65536, limit - len(out))})
                out += base64.b64decode(got.get("buf-b64", ""))
                if got.get("eof") or not got.get("count"):
                    return out
            return out
        finally:
            await self.call("guest-file-close", {"handle": handle})

    async def interfaces(self) -> list[dict[str, Any]]:
        """``guest-network-get-interfaces``: the guest's NICs and addresses."""
        return list(await self.call("guest-network-get-interfaces"))


async def _send(writer: asyncio.StreamWriter, command: str,
                arguments: Mapping[str, Any] | None) -> None:
    msg: dict[str, Any] = {"execute": command}
    if arguments:
        msg["arguments"] = dict(arguments)
    writer.write(json.dumps(msg).encode() + b"\n")
    await writer.drain()


async def _reply(reader: asyncio.StreamReader, command: str) -> Any:
    while True:
        line = await reader.readline()
        if not line:
            raise EOFError("the agent closed the connection")
        text = line.strip(b"\xff \r\n")
        if not text:
            continue
        msg = json.loads(text)
        if "error" in msg:
            desc = msg["error"].get("desc", msg["error"])
            raise MonitorError(f"guest agent: {command}: {desc}")
        if "return" in msg:
            return msg["return"]
