"""Lifecycle states of a supervised VM and the ways a VM can end."""

from __future__ import annotations

import enum
from dataclasses import dataclass

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
