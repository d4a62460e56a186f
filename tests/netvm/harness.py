"""The test side of :mod:`tests.netvm.server`: a supervisor process inside a namespace."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


class ServerError(AssertionError):
    """The server answered an error (``type`` is vmdriver's exception class)."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(f"{reply['type']}: {reply['error']}")
        self.reply = reply


class Served:
    """One supervisor process running in namespace ``ns``."""

    def __init__(self, ns: str, config: dict[str, Any], log: Path) -> None:
        self.log = log
        with log.open("ab") as err:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.netvm.server",
                 json.dumps(config)],
                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)

    def call(self, op: str, timeout: float = 120, **args: Any) -> dict[str, Any]:
        """One request; its reply. ServerError for an error reply."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"server: no answer to {op} within {timeout}s; log: {self.tail()}")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"server exited ({self.proc.poll()}) during {op}: {self.tail()}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise ServerError(reply)
        return reply

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def close(self) -> None:
        """Stop the supervisor's own helpers and let the process end."""
        if self.proc.poll() is None:
            self.call("close", timeout=30)
            self.proc.wait(10)
        self._pipes()

    def _pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def kill9(self) -> None:
        """kill -9: the supervisor dies, its QEMUs and dnsmasq do not."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._pipes()
