"""What a supervisor writes down so another one can re-attach to a running VM."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from vmdriver.runtime.helpers import HelperRecord
from vmdriver.runtime.jailing import JailRecord

#: Format version, bumped on incompatible changes.
RECORD_VERSION = 2


class VMRecord(BaseModel):
    """Everything re-attaching needs; stored in the runtime dir and in Nomad's driver_state."""

    model_config = ConfigDict(frozen=True)

    version: int = RECORD_VERSION
    id: str
    task: str
    alloc_dir: str
    runtime_dir: str
    data_dir: str
    pid: int
    #: psutil create_time of the pid: guards against pid reuse.
    pid_start_time: float
    qmp_socket: str
    qga_socket: str
    argv: list[str]
    spec: dict[str, Any]
    #: Unix time the VM was launched.
    started_at: float
    stdout: str
    stderr: str
    helpers: list[HelperRecord] = []
    #: cgroup dirs holding QEMU, and those the supervisor created (removed at the end).
    cgroup_paths: list[str] = []
    cgroups_created: list[str] = []
    #: The face removes the task dir when the VM ends (`vmdriver run`).
    remove_task_dir: bool = False
    #: QEMU's own pid when jailed (``pid`` is then the jail's monitor, which dies with it).
    qemu_pid: int | None = None
    jail: JailRecord | None = None

    def save(self, path: Path) -> None:
        """Write atomically (temp + rename): a crash of the supervisor never leaves half a
        record. No fsync (it took ~6 ms of every launch, in the event loop): a record
        only finds processes again, and none of them outlives the host losing power;
        one left unreadable by that loads as none."""
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, self.model_dump_json().encode())
        finally:
            os.close(fd)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> VMRecord | None:
        """The record at ``path``, or ``None`` if it is missing or unreadable."""
        with contextlib.suppress(OSError, ValueError, ValidationError):
            return cls.model_validate_json(path.read_bytes())
        return None


def records_under(state_dir: Path) -> list[VMRecord]:
    """Every readable VM record in a state dir's runtime dirs."""
    out = []
    for path in sorted((state_dir / "run").glob("*/vmdriver.json")):
        rec = VMRecord.load(path)
        if rec is not None:
            out.append(rec)
    return out
