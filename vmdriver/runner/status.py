"""The runner's state machine and ``<runtimeDir>/status.json``.

States are VM-Operator's: INITIALIZING → STARTING → BOOTING → BOOTED (the guest agent
answered) → TERMINATING → STOPPED. Each state change rewrites the status file
atomically (write + rename), so a readiness probe never reads half a file::

    {"state": "BOOTED", "cpus": 2, "ram": 2147483648, "osinfo": {...},
     "pending": ["cd0: tray locked by the guest"], "restart_needed": ["vm.maximumRam"],
     "exit_code": null, "updated": 1764590000.1}
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vmdriver.runner.config import RunnerConfig


class RunState(enum.StrEnum):
    """Where the runner is in a VM's life."""

    INITIALIZING = "INITIALIZING"
    STARTING = "STARTING"
    BOOTING = "BOOTING"
    BOOTED = "BOOTED"
    TERMINATING = "TERMINATING"
    STOPPED = "STOPPED"

    @property
    def vm_running(self) -> bool:
        """QEMU runs the guest (or is shutting it down)."""
        return self in (RunState.BOOTING, RunState.BOOTED, RunState.TERMINATING)

    @property
    def vm_active(self) -> bool:
        """The guest runs and no stop was asked for: runtime changes apply."""
        return self in (RunState.BOOTING, RunState.BOOTED)


class Status(BaseModel):
    """What status.json holds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    state: RunState
    #: vCPUs the guest has (VM-Operator: 1 while starting, 0 when stopped).
    cpus: int = 0
    #: Guest RAM in bytes (the balloon's actual size while running).
    ram: int = 0
    #: ``guest-get-osinfo``'s answer, once the guest agent gave it.
    osinfo: dict[str, Any] | None = None
    #: Changes accepted but not applied yet (e.g. a CD change waiting for a locked tray).
    pending: tuple[str, ...] = ()
    #: Config keys that changed and take effect only at the next start.
    restart_needed: tuple[str, ...] = ()
    #: QEMU's exit code, once it exited.
    exit_code: int | None = None
    updated: float = Field(default_factory=time.time)

    @classmethod
    def starting(cls, config: RunnerConfig) -> Status:
        """The status while QEMU starts: one vCPU and all of ``maximumRam``, as VM-Operator says."""
        return cls(state=RunState.STARTING, cpus=1, ram=config.vm.maximum_ram or 1 << 30)

    def to(self, state: RunState, **changes: Any) -> Status:
        """This status in another state (a stopped VM has no CPUs, RAM or OS info)."""
        if state == RunState.STOPPED:
            changes = {"cpus": 0, "ram": 0, "osinfo": None, "pending": (), **changes}
        return self.model_copy(update={"state": state, "updated": time.time(), **changes})


def write_status(path: Path, status: Status) -> None:
    """Replace ``path`` atomically with ``status`` as JSON (readable by a probe: 0644)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(status.model_dump_json() + "\n", encoding="utf-8")
        tmp.chmod(0o644)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_status(path: Path) -> Status | None:
    """The status in ``path``, or ``None`` if there is none (yet) or it is not a status."""
    try:
        return Status.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, ValidationError):
        return None


def is_ready(path: Path) -> bool:
    """What a readiness probe asks: the guest booted (its agent answered)."""
    status = read_status(path)
    return status is not None and status.state == RunState.BOOTED
