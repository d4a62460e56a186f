"""A minimal QMP client for tests: an operator's own client on the runner's monitor.sock."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


class Qmp:
    """A minimal QMP client over a unix socket (events skipped)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())
        self("qmp_capabilities")

    def __call__(self, command: str, **arguments: Any) -> Any:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.file.flush()
        while "event" in (reply := json.loads(self.file.readline())):
            pass
        assert "return" in reply, reply
        return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()
