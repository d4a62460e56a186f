"""Task directories, laid out the way Nomad lays them out.

::

    <alloc_dir>/alloc/{data,logs,tmp}       shared by the allocation's tasks
    <alloc_dir>/<task>/{local,secrets,tmp}  the task dir; QEMU's working directory
    <alloc_dir>/<task>/qmp.sock             QMP, for re-attaching
    <alloc_dir>/<task>/qa.sock              guest agent (when enabled)
    <alloc_dir>/<task>/vmdriver.json        what re-attaching needs
    <alloc_dir>/alloc/logs/<task>.stdout.0  serial console (QEMU's stdout)
    <alloc_dir>/alloc/logs/<task>.stderr.0  QEMU's own messages
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vmdriver.errors import SpecError

#: sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class TaskDir:
    """Paths of one task's directory."""

    alloc_dir: Path
    task: str

    @property
    def path(self) -> Path:
        """The task dir itself."""
        return self.alloc_dir / self.task

    @property
    def local(self) -> Path:
        """``local/``: where artifacts land."""
        return self.path / "local"

    @property
    def secrets(self) -> Path:
        """``secrets/``."""
        return self.path / "secrets"

    @property
    def shared(self) -> Path:
        """The allocation's shared ``alloc/`` dir."""
        return self.alloc_dir / "alloc"

    @property
    def qmp_socket(self) -> Path:
        """QMP unix socket, for re-attaching."""
        return self.path / "qmp.sock"

    @property
    def qga_socket(self) -> Path:
        """Guest agent socket (Nomad's name)."""
        return self.path / "qa.sock"

    @property
    def state_file(self) -> Path:
        """JSON with what re-attaching needs."""
        return self.path / "vmdriver.json"

    @property
    def stdout(self) -> Path:
        """Serial console log."""
        return self.shared / "logs" / f"{self.task}.stdout.0"

    @property
    def stderr(self) -> Path:
        """QEMU's stderr log."""
        return self.shared / "logs" / f"{self.task}.stderr.0"

    def check_socket_paths(self) -> None:
        """Refuse before launch if a socket path would not fit in sun_path."""
        for sock in (self.qmp_socket, self.qga_socket):
            if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
                raise SpecError(
                    f"socket path is {len(os.fsencode(sock))} bytes, longer than the "
                    f"{MAX_SOCKET_PATH} a unix socket allows; use a shorter task name "
                    "or state dir",
                    where=str(sock),
                )

    def create(self) -> None:
        """Make the directories, private to the owner.

        An alloc dir that exists already (Nomad's) keeps its mode.
        """
        if not self.alloc_dir.exists():
            self.alloc_dir.parent.mkdir(parents=True, exist_ok=True)
            self.alloc_dir.mkdir(mode=0o700, exist_ok=True)
        for d in (self.path, self.local, self.secrets, self.path / "tmp",
                  self.shared / "data", self.shared / "logs", self.shared / "tmp"):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
