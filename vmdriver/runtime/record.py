"""What a supervisor writes down so another one can re-attach to a running VM."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class VMRecord(BaseModel):
    """Everything re-attaching needs; stored as ``vmdriver.json`` and in Nomad's driver_state."""

    model_config = ConfigDict(frozen=True)

    #: Format version, bumped on incompatible changes.
    version: int = 1
    id: str
    task: str
    alloc_dir: str
    pid: int
    #: psutil create_time of the pid: guards against pid reuse.
    pid_start_time: float
    qmp_socket: str
    argv: list[str]
    spec: dict[str, Any]
    #: Unix time the VM was launched.
    started_at: float
    stdout: str
    stderr: str
