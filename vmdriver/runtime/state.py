"""Lifecycle states of a supervised VM and the ways a VM can end."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vmdriver.errors import last_line


class VMState(enum.StrEnum):
    """Where a VM is in its life. Transitions only go down this list."""

    DEFINED = "defined"
    LAUNCHING = "launching"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"


class ExitKind(enum.StrEnum):
    """How a VM ended, from the supervisor's point of view."""

    #: The guest powered itself off (or rebooted with -no-reboot).
    GUEST_POWEROFF = "guest powered off"
    #: Stopped on request and the guest powered off in time (or QEMU obeyed the signal).
    STOPPED = "stopped on request"
    #: Stopped on request but the guest ignored it; QEMU was killed after the timeout.
    KILLED = "killed after the stop timeout"
    #: The guest kernel panicked (pvpanic).
    PANICKED = "guest panicked"
    #: QEMU exited with an error or died of a signal nobody sent.
    CRASHED = "QEMU crashed"
    #: The process is gone and how it ended is unknown (re-attached VM, no events seen).
    LOST = "QEMU exited, status unknown"


@dataclass(frozen=True)
class ExitResult:
    """The end of a VM, in the terms Nomad's WaitTask uses plus vmdriver's own."""

    kind: ExitKind
    #: Process exit code; 128+N for death by signal N (Nomad's convention); -1 unknown.
    exit_code: int
    #: Signal number that ended QEMU, 0 if none.
    signal: int = 0
    #: Last lines QEMU wrote on stderr, for crash reports.
    stderr_tail: str = ""
    #: True if the guest shut down cleanly (ACPI), whoever asked.
    clean: bool = False

    @property
    def successful(self) -> bool:
        """True for the ends `vmdriver run` treats as success (exit status 0)."""
        return self.kind in (ExitKind.GUEST_POWEROFF, ExitKind.STOPPED)

    def describe(self) -> str:
        """One line for humans."""
        text = str(self.kind)
        if self.kind is ExitKind.CRASHED:
            text += f" (exit code {self.exit_code})"
            if last_line(self.stderr_tail):
                text += f": {last_line(self.stderr_tail)}"
        return text


def classify(events: Sequence[Mapping[str, Any]], code: int, sig: int, *, stop_requested: bool,
             forced: bool, child: bool, stderr_tail: str = "") -> ExitResult:
    """How a VM ended, from the QMP events seen, QEMU's exit status and who asked for the end.

    ``forced``: the stop ladder had to signal or SIGKILL QEMU. ``child``: QEMU is this
    process's child, so ``code`` and ``sig`` are real; a re-attached VM's status is
    unknowable, and QEMU exits 0 after a SHUTDOWN event, so that is assumed then.
    ``stderr_tail``: QEMU's last words, kept for crashes and failed panics.
    """
    names = [e.get("event") for e in events]
    shutdown = next((e.get("data", {}) for e in events if e.get("event") == "SHUTDOWN"), None)
    reason = str(shutdown.get("reason", "")) if shutdown else ""
    clean = reason == "guest-shutdown"
    if not child:
        code = 0 if shutdown is not None else -1
    if "GUEST_PANICKED" in names or reason == "guest-panic":
        return ExitResult(ExitKind.PANICKED, code, sig, stderr_tail if code != 0 else "")
    if stop_requested:
        kind = ExitKind.KILLED if forced else ExitKind.STOPPED
        return ExitResult(kind, code, sig, "", clean)
    if "POWERDOWN" in names and clean:
        return ExitResult(ExitKind.STOPPED, code, sig, "", clean)
    if reason in ("guest-shutdown", "guest-reset") and code == 0:
        return ExitResult(ExitKind.GUEST_POWEROFF, code, sig, "", clean)
    if reason.startswith("host-") and code == 0:
        return ExitResult(ExitKind.STOPPED, code, sig, "", clean)
    if code == -1:
        return ExitResult(ExitKind.LOST, code, sig)
    return ExitResult(ExitKind.CRASHED, code, sig, stderr_tail)
