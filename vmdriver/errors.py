"""The exceptions vmdriver raises.

Every error raised on purpose derives from :class:`VmdriverError`, so a face
(CLI, Nomad plugin, runner) can catch one class and turn it into a short
message (exit status 2 for bad input, a gRPC status for Nomad)::

    VmdriverError
     ├── InputError                 bad input from a user or operator: exit 2
     │    ├── JobFileError          a job file cannot be read or is malformed
     │    ├── SpecError             a field has a value that is not allowed
     │    ├── HostConfigError       the operator's host configuration is invalid
     │    └── PolicyError           the operator's policy forbids what was asked
     ├── HostError                  this machine cannot do what was asked
     │    ├── EmulatorNotFound      no qemu-system-<arch> binary
     │    └── AcceleratorUnavailable  e.g. kvm asked for where it does not work
     ├── ArtifactError              an image could not be fetched or verified
     ├── LaunchError                QEMU could not be started or died at once
     ├── MonitorError               a QMP conversation failed
     ├── StateError                 an operation does not fit the VM's state
     └── TaskNotFound               no VM with that id is known

Errors carry structured context (``where``, ``field``, ``value``, ``allowed``)
so each face can render them its own way; ``str()`` is the one-line form.
"""

from __future__ import annotations

from collections.abc import Sequence


def last_line(text: str) -> str:
    """The last non-blank line of ``text`` (stripped), or ``""``: how a crash is summed up."""
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return ""


class VmdriverError(Exception):
    """Root of every error vmdriver raises on purpose."""

    #: Exit status the CLI uses for this kind of error.
    exit_status: int = 1


class InputError(VmdriverError):
    """Input from a user or operator is wrong; nothing was started.

    :param message: what is wrong, in a few words.
    :param where: the place: a file, a task, a field path.
    :param value: the offending value, if any.
    :param allowed: what would have been accepted.
    """

    exit_status = 2

    def __init__(
        self,
        message: str,
        *,
        where: str = "",
        value: object = None,
        allowed: str | Sequence[str] = "",
    ) -> None:
        self.message = message
        self.where = where
        self.value = value
        self.allowed = allowed if isinstance(allowed, str) else ", ".join(allowed)
        super().__init__(self.render())

    def render(self) -> str:
        """One line: ``where: message (got 'x'; allowed: a, b)``."""
        parts = [f"{self.where}: {self.message}" if self.where else self.message]
        extra = []
        if self.value is not None:
            extra.append(f"got {self.value!r}")
        if self.allowed:
            extra.append(f"allowed: {self.allowed}")
        if extra:
            parts.append(f" ({'; '.join(extra)})")
        return "".join(parts)


class JobFileError(InputError):
    """A job file cannot be read, parsed, or has the wrong shape."""


class SpecError(InputError):
    """A field of a task, VM or runner config has a value that is not allowed."""


class HostConfigError(InputError):
    """The operator's host configuration is invalid."""


class PolicyError(InputError):
    """The operator's policy forbids what the job asks for."""


class HostError(VmdriverError):
    """This host cannot do what was asked (missing binary, no KVM, ...)."""

    exit_status = 2


class EmulatorNotFound(HostError):
    """No usable ``qemu-system-<arch>`` binary was found."""


class AcceleratorUnavailable(HostError):
    """The requested accelerator does not work on this host."""


class ArtifactError(VmdriverError):
    """An artifact could not be fetched, verified or unpacked."""

    def __init__(self, source: str, cause: str) -> None:
        self.source = source
        self.cause = cause
        super().__init__(f"artifact {source}: {cause}")


class LaunchError(VmdriverError):
    """QEMU could not be started, or exited before it was running.

    :param message: what failed.
    :param exit_code: QEMU's exit status, if it ran.
    :param stderr_tail: the last lines QEMU wrote to stderr.
    """

    def __init__(self, message: str, *, exit_code: int | None = None, stderr_tail: str = "") -> None:
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail
        text = message
        if exit_code is not None:
            text += f" (exit code {exit_code})"
        if last_line(stderr_tail):
            text += f": {last_line(stderr_tail)}"
        super().__init__(text)


class MonitorError(VmdriverError):
    """A QMP conversation with QEMU failed."""


class StateError(VmdriverError):
    """An operation was asked of a VM in a state that does not allow it."""

    def __init__(self, vm: str, state: str, required: str) -> None:
        self.state = state
        self.required = required
        super().__init__(f"VM {vm} is {state}; this needs it {required}")


class TaskNotFound(VmdriverError):
    """No VM with that id is known to this supervisor."""
