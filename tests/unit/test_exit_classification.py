"""How a VM ended, as a table: QMP events, QEMU's exit status, and who asked for the end.

:func:`vmdriver.runtime.state.classify` is what `vmdriver run` turns into its exit
status and Nomad's WaitTask into exit code and error; every row is one way a VM
can end, with the kind, the cleanliness and the success it must be reported as.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

import pytest

from vmdriver.errors import LaunchError
from vmdriver.runtime.state import ExitKind, ExitResult, classify

TAIL = "qemu-system-x86_64: warning: something\nqemu-system-x86_64: terminating on signal 11\n"
KILL, SEGV = int(signal.SIGKILL), int(signal.SIGSEGV)


def ev(name: str, reason: str | None = None) -> dict[str, Any]:
    """A QMP event as qemu.qmp hands it over."""
    event: dict[str, Any] = {"event": name, "timestamp": {"seconds": 1, "microseconds": 0}}
    if reason is not None:
        event["data"] = {"guest": reason.startswith("guest"), "reason": reason}
    return event


@dataclass(frozen=True)
class Row:
    events: tuple[dict[str, Any], ...]
    code: int
    sig: int = 0
    stop_requested: bool = False
    forced: bool = False
    child: bool = True
    # Expected:
    kind: ExitKind = ExitKind.CRASHED
    exit_code: int | None = None  # None: the code given
    clean: bool = False
    tail_kept: bool = False


POWERDOWN, PANICKED = ev("POWERDOWN"), ev("GUEST_PANICKED")
OFF, RESET = ev("SHUTDOWN", "guest-shutdown"), ev("SHUTDOWN", "guest-reset")
HOST_SIGNAL, HOST_QMP = ev("SHUTDOWN", "host-signal"), ev("SHUTDOWN", "host-qmp-quit")
PANIC_OFF = ev("SHUTDOWN", "guest-panic")

TABLE = {
    # The guest ends on its own.
    "guest powers off": Row((OFF,), 0, kind=ExitKind.GUEST_POWEROFF, clean=True),
    "guest reboots under -no-reboot": Row((RESET,), 0, kind=ExitKind.GUEST_POWEROFF),
    "guest panics (pvpanic)": Row((PANICKED, PANIC_OFF), 0, kind=ExitKind.PANICKED),
    "guest panics, QEMU fails": Row((PANICKED,), 1, kind=ExitKind.PANICKED, tail_kept=True),
    "panic wins over a stop": Row((POWERDOWN, PANICKED), 0, stop_requested=True,
                                  kind=ExitKind.PANICKED),
    # Stops on request, by the ladder.
    "ACPI stop, guest obeys": Row((POWERDOWN, OFF), 0, stop_requested=True,
                                  kind=ExitKind.STOPPED, clean=True),
    "signal stop, QEMU obeys": Row((HOST_SIGNAL,), 0, stop_requested=True, kind=ExitKind.STOPPED),
    "ACPI ignored, SIGKILL": Row((POWERDOWN,), 128 + KILL, KILL, stop_requested=True, forced=True,
                                kind=ExitKind.KILLED),
    "ACPI ignored, signal obeyed": Row((POWERDOWN, HOST_SIGNAL), 0, stop_requested=True,
                                       forced=True, kind=ExitKind.KILLED),
    "forced DestroyTask": Row((), 128 + KILL, KILL, stop_requested=True, forced=True,
                              kind=ExitKind.KILLED),
    # Stops someone else asked for (another QMP client, `kill` by hand).
    "button pressed elsewhere": Row((POWERDOWN, OFF), 0, kind=ExitKind.STOPPED, clean=True),
    "SIGTERM from outside": Row((HOST_SIGNAL,), 0, kind=ExitKind.STOPPED),
    "quit over QMP": Row((HOST_QMP,), 0, kind=ExitKind.STOPPED),
    # QEMU itself fails.
    "QEMU segfaults": Row((), 128 + SEGV, SEGV, kind=ExitKind.CRASHED, tail_kept=True),
    "QEMU exits 1": Row((), 1, kind=ExitKind.CRASHED, tail_kept=True),
    "exit 1 despite a clean reason": Row((OFF,), 1, kind=ExitKind.CRASHED, tail_kept=True),
    "SIGKILL nobody sent (OOM)": Row((), 128 + KILL, KILL, kind=ExitKind.CRASHED, tail_kept=True),
    # Re-attached VMs: the exit status is not ours to read.
    "re-attached, guest powers off": Row((OFF,), -1, child=False, kind=ExitKind.GUEST_POWEROFF,
                                         exit_code=0, clean=True),
    "re-attached, stopped": Row((POWERDOWN, OFF), -1, stop_requested=True, child=False,
                                kind=ExitKind.STOPPED, exit_code=0, clean=True),
    "re-attached, killed without QMP": Row((), -1, stop_requested=True, forced=True, child=False,
                                           kind=ExitKind.KILLED),
    "re-attached, gone unseen": Row((), -1, child=False, kind=ExitKind.LOST),
}

SUCCESS = {ExitKind.GUEST_POWEROFF, ExitKind.STOPPED}


@pytest.mark.parametrize("row", list(TABLE.values()), ids=list(TABLE))
def test_exit_classification(row: Row) -> None:
    res = classify(row.events, row.code, row.sig, stop_requested=row.stop_requested,
                   forced=row.forced, child=row.child, stderr_tail=TAIL)
    assert res.kind is row.kind, res
    assert res.exit_code == (row.code if row.exit_code is None else row.exit_code)
    assert res.signal == row.sig
    assert res.clean is row.clean
    assert res.successful is (row.kind in SUCCESS)
    assert res.stderr_tail == (TAIL if row.tail_kept else "")


def test_crash_is_described_by_qemus_last_line() -> None:
    res = classify((), 128 + SEGV, SEGV, stop_requested=False, forced=False, child=True,
                   stderr_tail=TAIL + "\n  \n")
    assert res.describe() == "QEMU crashed (exit code 139): qemu-system-x86_64: terminating on signal 11"


@pytest.mark.parametrize("tail", ["", "\n", "  \n\t\n"])
def test_blank_stderr_tails_do_not_break_reports(tail: str) -> None:
    assert ExitResult(ExitKind.CRASHED, 1, 0, tail).describe() == "QEMU crashed (exit code 1)"
    assert str(LaunchError("QEMU exited during start-up", exit_code=1, stderr_tail=tail)) \
        == "QEMU exited during start-up (exit code 1)"
