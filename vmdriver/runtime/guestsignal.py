"""Signals for a VM's guest: what `nomad alloc signal` and `vmdriver signal` mean for a VM.

- SIGTERM and SIGINT (with no process named) ask the guest OS to shut down
  gracefully: the agent's ``guest-shutdown`` (powerdown), else the ACPI power
  button. The VM then ends as a guest power-off; nothing escalates (that is what
  stopping the task is for).
- Any other signal, or any signal with a process name, is sent inside the guest
  by a shell run through ``guest-exec``: to every user process but init (PID 1),
  the guest agent and the helper shell itself (so the agent survives a SIGHUP,
  which would end it), or only to the processes whose name (``comm``) matches.
  Kernel threads are skipped (they have no ``exe``).
"""

from __future__ import annotations

import signal as _signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from vmdriver.errors import InputError, MonitorError
from vmdriver.qemu.agent import GuestAgent
from vmdriver.runtime import guestexec

#: Signals that mean "shut the guest down" when no process is named.
SHUTDOWN_SIGNALS = frozenset({_signal.SIGTERM, _signal.SIGINT})
#: Runs in the guest's /bin/sh: builtins only, so no helper process of ours is hit.
_KILL_SCRIPT = r'''
sig=$1; name=$2; n=0
for d in /proc/[0-9]*; do
    p=${d#/proc/}
    case "$p" in 1|$$|$PPID) continue ;; esac
    [ -e "$d/exe" ] || continue
    if [ -n "$name" ]; then
        c=; read -r c <"$d/comm" 2>/dev/null
        [ "$c" = "$name" ] || continue
    fi
    kill -"$sig" "$p" 2>/dev/null && n=$((n + 1))
done
echo "$n"
'''


@dataclass(frozen=True)
class SignalOutcome:
    """What sending a signal did, for an event line."""

    signal: str
    #: "shutdown" (the guest was asked to power off) or "processes".
    action: str
    #: Processes signalled (``action == "processes"``).
    count: int = 0

    def describe(self) -> str:
        """One line for users."""
        if self.action == "shutdown":
            return f"{self.signal}: asked the guest to shut down"
        return f"{self.signal} sent to {self.count} guest process{'es' if self.count != 1 else ''}"


def parse_signal(value: str) -> _signal.Signals:
    """``SIGHUP``, ``HUP``, ``hup`` or ``1`` as a signal; InputError otherwise."""
    text = value.strip().upper()
    try:
        if text.isdigit():
            return _signal.Signals(int(text))
        return _signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
    except (KeyError, ValueError):
        raise InputError("unknown signal", where="signal", value=value,
                         allowed="a signal name such as SIGHUP or HUP, or its number") from None


async def signal_guest(agent: GuestAgent, value: str, *, process: str = "",
                       powerdown: Callable[[], Awaitable[object]] | None = None) -> SignalOutcome:
    """Deliver ``value`` to the guest as the module docstring says.

    ``powerdown`` presses the ACPI button (QMP) when the agent cannot shut down.
    """
    sig = parse_signal(value)
    if sig in SHUTDOWN_SIGNALS and not process:
        try:
            await guestexec.require_agent(agent, f"{sig.name}")
            await agent.shutdown("powerdown")
        except MonitorError:
            if powerdown is None:
                raise
            await powerdown()
        return SignalOutcome(sig.name, "shutdown")
    await guestexec.require_agent(agent, f"{sig.name}")
    got = await guestexec.capture(agent, ["/bin/sh", "-c", _KILL_SCRIPT, "sh", str(int(sig)),
                                          process], timeout=30)
    try:
        count = int(got.stdout.decode().strip() or "0")
    except ValueError:
        raise MonitorError(f"signalling guest processes failed: "
                           f"{got.stderr.decode(errors='replace').strip()}") from None
    if process and count == 0:
        raise InputError("no process with this name runs in the guest", where="signal",
                         value=process)
    return SignalOutcome(sig.name, "processes", count)
