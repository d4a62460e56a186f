"""Where QEMU's stdout (the serial console) and stderr go, bounded in size.

A log that is a regular file (``<task>.stdout.0`` in the alloc's ``logs/``, a
runner's ``--console FILE``) is not given to QEMU: QEMU gets a pipe, and the VM's
log writer (:mod:`vmdriver.runtime.logwriter`, a helper process of the VM,
recorded and stopped after QEMU like swtpm, forked for it by the supervisor's
:class:`~vmdriver.runtime.logserver.WriterServer`) appends it to the file, rotating to
``.1`` at the host's ``max_log_size``. A guest printing without end then costs
at most twice that per stream on disk.

Anything else is handed to QEMU as before: Nomad's logmon FIFOs (Nomad rotates),
and symlinks such as the runner's ``/dev/stdout`` (a pod's log; the container
runtime rotates it).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from vmdriver.errors import HostError
from vmdriver.runtime import logwriter
from vmdriver.runtime.helpers import Helper
from vmdriver.runtime.logserver import WriterServer
from vmdriver.runtime.process import close_fds

#: The writer's name among the VM's helpers (in the record, for re-attaching).
LOG_WRITER = "logwriter"
#: Bytes a pipe holds before QEMU's writes wait for the writer (Linux's default
#: pipe-max-size; the default 64 KiB is one burst of a busy console).
PIPE_SIZE = 1 << 20
#: How long the writer gets to copy what QEMU printed last, before it is read.
FLUSH_TIMEOUT_S = 2.0


@dataclass
class Outputs:
    """QEMU's stdout and stderr as :meth:`ManagedProcess.spawn` takes them."""

    #: A pipe's write end (ours until closed), or a path for QEMU to open.
    stdout: Path | int
    stderr: Path | int
    writer: Helper | None = None

    def close(self) -> None:
        """Close our write ends: once QEMU has its copies, the writer's EOF is QEMU's exit."""
        close_fds(tuple(fd for fd in (self.stdout, self.stderr) if isinstance(fd, int)))
        self.stdout = self.stderr = -1


def rotatable(path: Path) -> bool:
    """True for a regular file (or none yet); FIFOs, devices and symlinks are left alone."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return True
    except OSError as exc:
        raise HostError(f"cannot use the log {path}: {exc.strerror}") from None


def _create(path: Path) -> None:
    """Make the log before QEMU starts: readers wait for it, and a log that cannot be
    written is an error now rather than a silent loss later."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600))
    except OSError as exc:
        raise HostError(f"cannot open the log {path}: {exc.strerror}") from None


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    with contextlib.suppress(OSError):  # above pipe-max-size for a non-root user: keep 64 KiB
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


def rotated_name(path: Path) -> Path:
    """Where the writer moves a full log: ``web.stdout.0`` → ``web.stdout.1``."""
    return Path(logwriter.rotated_name(str(path)))


async def open_outputs(stdout: Path, stderr: Path, *, max_bytes: int, log_dir: Path,
                       server: WriterServer) -> Outputs:
    """QEMU's outputs, with a log writer started for those that are regular files."""
    files = [p for p in dict.fromkeys((stdout, stderr)) if rotatable(p)]
    if not files:
        return Outputs(stdout, stderr)
    pipes: dict[Path, tuple[int, int]] = {}
    try:
        for path in files:
            _create(path)
            pipes[path] = _pipe()
        log_path = log_dir / f"{LOG_WRITER}.log"
        proc = await server.writer(max_bytes, {r: p for p, (r, _) in pipes.items()}, log_path)
    except BaseException:
        close_fds(tuple(w for _, w in pipes.values()))
        raise
    finally:
        close_fds(tuple(r for r, _ in pipes.values()))
    return Outputs(pipes[stdout][1] if stdout in pipes else stdout,
                   pipes[stderr][1] if stderr in pipes else stderr,
                   Helper(LOG_WRITER, proc, log_path))


def tail(path: Path, limit: int = 4000) -> str:
    """The last ``limit`` bytes of a log file, as text, reaching back into its rotated
    ``.1`` when the current file is shorter (it may have just been begun).

    Only regular files: Nomad's log FIFOs cannot be re-read (opening one for
    reading blocks, and reading would take the lines from logmon).
    """
    data = _last_bytes(path, limit)
    if len(data) < limit:
        data = _last_bytes(rotated_name(path), limit - len(data)) + data
    return data.decode(errors="replace")


def _last_bytes(path: Path, limit: int) -> bytes:
    if not path.is_file():
        return b""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - limit))
            return f.read()
    except OSError:
        return b""


async def flushed(writer: Helper | None) -> None:
    """Wait (briefly) until the writer has copied everything QEMU wrote: it exits at the
    pipes' EOF, which is QEMU's exit. Then the logs can be read for QEMU's last words."""
    if writer is None:
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(writer.proc.wait()), FLUSH_TIMEOUT_S)
