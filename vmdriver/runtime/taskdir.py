"""Where a VM's files live: the task dir (Nomad's layout), a runtime dir, a data dir.

::

    <alloc_dir>/alloc/{data,logs,tmp}        shared by the allocation's tasks
    <alloc_dir>/<task>/{local,secrets,tmp}   the task dir; QEMU's working directory
    <alloc_dir>/alloc/logs/<task>.stdout.0   serial console (QEMU's stdout)
    <alloc_dir>/alloc/logs/<task>.stderr.0   QEMU's own messages

    <runtime dir>/                           seeds, helper logs, the VM record: removed
                                             when the VM ends; outside anything a job names
    <runtime dir>/vm/                        QMP, guest agent, TPM and virtiofs sockets: the
                                             one part a jailed QEMU may write (never the record)
    <data dir>/                              UEFI vars, TPM state, volumes: kept as long as
                                             the face wants (a restart finds them again)

The control plane (QMP, the guest agent socket, the record) lives in the runtime
dir, never in the task dir a job can name in its args.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from vmdriver.errors import HostError, SpecError

#: sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
#: The record re-attaching needs, in the runtime dir.
RECORD_NAME = "vmdriver.json"


@dataclass(frozen=True)
class TaskDir:
    """Paths of one task's directory, in Nomad's layout."""

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
    def stdout(self) -> Path:
        """Serial console log."""
        return self.shared / "logs" / f"{self.task}.stdout.0"

    @property
    def stderr(self) -> Path:
        """QEMU's stderr log."""
        return self.shared / "logs" / f"{self.task}.stderr.0"

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


def vm_key(vm_id: str) -> str:
    """A short, path-safe name for a VM id (ids hold ``/`` and may be long)."""
    return hashlib.sha256(vm_id.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class VMDirs:
    """The three places of one VM."""

    task: TaskDir
    #: Sockets, seeds, the record: removed when the VM ends.
    runtime: Path
    #: Persistent state (UEFI vars, TPM): kept unless the face removes it.
    data: Path
    #: Names of the QMP and guest-agent sockets (the runner uses VM-Operator's names).
    qmp_name: str = "qmp.sock"
    qga_name: str = "qga.sock"
    #: Where QEMU's sockets go; ``None``: ``<runtime>/vm``. It must not hold the
    #: record: a jailed QEMU may write here.
    socket_dir: Path | None = None

    @classmethod
    def under(cls, state_dir: Path, vm_id: str, task: TaskDir) -> VMDirs:
        """The default places under a state dir: ``run/<key>`` and ``data/<key>``."""
        key = vm_key(vm_id)
        return cls(task, state_dir / "run" / key, state_dir / "data" / key)

    @property
    def sockets(self) -> Path:
        """The dir of QEMU's sockets (and its helpers')."""
        return self.socket_dir or self.runtime / "vm"

    @property
    def qmp_socket(self) -> Path:
        """QMP unix socket, for re-attaching."""
        return self.sockets / self.qmp_name

    @property
    def qga_socket(self) -> Path:
        """Guest agent socket."""
        return self.sockets / self.qga_name

    @property
    def record(self) -> Path:
        """JSON with what re-attaching needs."""
        return self.runtime / RECORD_NAME

    def check_socket_paths(self) -> None:
        """Refuse before launch if a socket path would not fit in sun_path."""
        for sock in (self.qmp_socket, self.qga_socket, self.sockets / "vfs-xxxxxxxxxxxxxxx.sock"):
            if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
                raise SpecError(
                    f"socket path is {len(os.fsencode(sock))} bytes, longer than the "
                    f"{MAX_SOCKET_PATH} a unix socket allows; use a shorter state or runtime dir",
                    where=str(sock),
                )

    def create(self) -> None:
        """Make the task dir, and the runtime and data dirs private to the owner."""
        try:
            self.task.create()
            for d in (self.runtime, self.data, self.sockets):
                d.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                d.mkdir(exist_ok=True, mode=0o700)
        except OSError as exc:
            raise HostError(f"cannot create {exc.filename}: {exc.strerror}") from None

    def remove_runtime(self) -> None:
        """Remove the runtime dir and everything in it (the VM has ended)."""
        shutil.rmtree(self.runtime, ignore_errors=True)
        if self.socket_dir is not None:
            for name in (self.qmp_name, self.qga_name):
                (self.socket_dir / name).unlink(missing_ok=True)
