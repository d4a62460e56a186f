"""A minimal synchronous guest-agent client: run a command in the test guest, list its NICs."""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from pathlib import Path
from typing import Any


class Agent:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _call(self, sock: socket.socket, reader: Any, cmd: dict[str, Any]) -> Any:
        sock.sendall(json.dumps(cmd).encode() + b"\n")
        while True:
            line = reader.readline()
            if not line:
                raise ConnectionError("guest agent closed the connection")
            msg = json.loads(line)
            if "error" in msg:
                raise RuntimeError(f"guest agent: {msg['error']}")
            if "return" in msg:
                return msg["return"]

    def call(self, execute: str, timeout: float = 15, **arguments: Any) -> Any:
        """One command after a guest-sync (which drops stale replies in the channel)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.path))
            reader = sock.makefile("rb")
            token = random.randrange(1 << 30)
            sock.sendall(json.dumps({"execute": "guest-sync", "arguments": {"id": token}}).encode() + b"\n")
            while json.loads(reader.readline() or b"{}").get("return") != token:
                pass
            cmd: dict[str, Any] = {"execute": execute}
            if arguments:
                cmd["arguments"] = arguments
            return self._call(sock, reader, cmd)

    def interfaces(self) -> list[dict[str, Any]]:
        return list(self.call("guest-network-get-interfaces"))

    def run(self, path: str, *args: str, timeout: float = 20) -> tuple[int, str]:
        """Run a program in the guest; (exit code, stdout+stderr)."""
        pid = self.call("guest-exec", path=path, arg=list(args), **{"capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.call("guest-exec-status", pid=pid)
            if st.get("exited"):
                out = b"".join(base64.b64decode(st.get(k, "")) for k in ("out-data", "err-data"))
                return int(st.get("exitcode", -1)), out.decode(errors="replace")
            time.sleep(0.2)
        raise TimeoutError(f"{path} {args} did not finish in {timeout}s")
