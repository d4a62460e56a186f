"""A supervised process (QEMU or a helper): spawned as our child, or found again.

Exit is observed through a pidfd in the event loop (no watcher threads), for
children and re-attached processes alike. A re-attached process is identified by
pid *and* start time, so a reused pid is never mistaken for the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

import psutil

from vmdriver.errors import LaunchError
from vmdriver.jail.plan import catches


def process_start_time(pid: int) -> float | None:
    """Start time of ``pid`` as psutil reports it, or ``None`` if it is gone."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _output(target: Path | int) -> int:
    """An fd given as is, else the log file or FIFO (Nomad's logmon) opened for writing."""
    if isinstance(target, int):
        return target
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
    if not target.exists():
        flags |= os.O_CREAT
    return os.open(target, flags, 0o600)


#: Signals that act on a pid namespace's init from outside whether it handles them or not
#: (SIGCONT continues a stopped process as it is sent).
_FORCED = frozenset({signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT})
#: Signals whose default action is to ignore them.
_IGNORED_BY_DEFAULT = frozenset({signal.SIGCHLD, signal.SIGURG, signal.SIGWINCH})


def signal_jailed(monitor: ManagedProcess, pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid``, the init of its pid namespace under the jail's ``monitor``,
    with the effect it has on an ordinary process. The kernel gives such an init only the
    signals it handles (and SIGKILL/SIGSTOP): one whose default action would end the
    process becomes SIGKILL of the jail, one that would be ignored is dropped."""
    if sig in _FORCED or catches(pid, sig):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    elif sig not in _IGNORED_BY_DEFAULT:
        monitor.kill_group()


def close_fds(fds: tuple[int, ...]) -> None:
    """Close fds handed to QEMU (it has its own copies now); ignore ones already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class ManagedProcess:
    """One process we supervise, with exit observed through a pidfd."""

    def __init__(self, pid: int, start_time: float, *, child: bool) -> None:
        self.pid = pid
        self.start_time = start_time
        #: True if this process is our child (so its exit status can be read).
        self.child = child
        self._pidfd = os.pidfd_open(pid)
        self._exit: asyncio.Future[tuple[int, int]] | None = None

    @classmethod
    def spawn(
        cls,
        argv: tuple[str, ...],
        *,
        cwd: Path,
        env: Mapping[str, str],
        stdout: Path | int,
        stderr: Path | int,
        pass_fds: tuple[int, ...],
    ) -> ManagedProcess:
        """Start ``argv`` directly (no shell) in a new process group.

        ``stdout``/``stderr``: a file or FIFO to open, or an open fd (a log writer's
        pipe), which stays the caller's to close.
        """
        out, err = _output(stdout), _output(stderr)
        try:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=out,
                stderr=err, pass_fds=pass_fds, process_group=0, close_fds=True,
                # Sockets and files it creates (QMP, guest agent, swtpm) are the owner's only.
                umask=0o177,
            )
        except OSError as exc:
            raise LaunchError(f"cannot execute {argv[0]}: {exc.strerror}") from exc
        finally:
            close_fds(tuple(fd for fd, given in ((out, stdout), (err, stderr))
                            if not isinstance(given, int)))
        # The pidfd, not Popen, owns the process from here on: Popen would try to
        # reap it in its destructor.
        proc.returncode = 0
        start = process_start_time(proc.pid) or 0.0
        return cls(proc.pid, start, child=True)

    @classmethod
    def attach(cls, pid: int, start_time: float) -> ManagedProcess | None:
        """The running process ``pid`` if it is the one that started at ``start_time``."""
        actual = process_start_time(pid)
        if actual is None or abs(actual - start_time) > 0.05:
            return None
        try:
            return cls(pid, start_time, child=False)
        except ProcessLookupError:
            return None

    def alive(self) -> bool:
        """True while the process exists (and is not a zombie we have not reaped)."""
        if self._exit is not None and self._exit.done():
            return False
        try:
            return bool(psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return False

    def wait(self) -> asyncio.Future[tuple[int, int]]:
        """A future of ``(exit_code, signal)``; ``(-1, 0)`` if the status is unknowable."""
        if self._exit is None:
            loop = asyncio.get_running_loop()
            self._exit = loop.create_future()
            loop.add_reader(self._pidfd, self._on_exit)
        return self._exit

    def _on_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        code, sig = -1, 0
        if self.child:
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(self.pid, 0)
                rc = os.waitstatus_to_exitcode(status)
                code, sig = (128 - rc, -rc) if rc < 0 else (rc, 0)
        os.close(self._pidfd)
        self._pidfd = -1
        if self._exit is not None and not self._exit.done():
            self._exit.set_result((code, sig))

    def send_signal(self, sig: int) -> None:
        """Signal the process, unless the pid no longer belongs to it."""
        if self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def kill_group(self) -> None:
        """SIGKILL the process and anything it started in its process group."""
        self.send_signal(signal.SIGKILL)
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    def close(self) -> None:
        """Release the pidfd of a process we stop watching without waiting for it."""
        if self._pidfd >= 0:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
