"""Helper processes a VM owns (swtpm, virtiofsd): started before QEMU, stopped after it.

Each helper is spawned in its own process group, must create its socket within
its start timeout, and is recorded (pid + start time) with the VM, so a later
supervisor that re-attaches also stops it: a helper is never orphaned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from vmdriver.errors import LaunchError, last_line
from vmdriver.qemu.sidecars import HelperSpec
from vmdriver.runtime.process import ManagedProcess

log = logging.getLogger(__name__)

#: Seconds a helper gets to exit after SIGTERM before SIGKILL.
STOP_GRACE_S = 3.0
_POLL_S = 0.02


class HelperRecord(BaseModel):
    """What re-attaching needs of a helper."""

    model_config = ConfigDict(frozen=True)

    name: str
    pid: int
    pid_start_time: float


@dataclass
class Helper:
    """A running helper process."""

    name: str
    proc: ManagedProcess
    log_path: Path

    def record(self) -> HelperRecord:
        """The helper as the VM record stores it."""
        return HelperRecord(name=self.name, pid=self.proc.pid, pid_start_time=self.proc.start_time)


async def start_helpers(specs: tuple[HelperSpec, ...], runtime_dir: Path,
                        env: Mapping[str, str], *, owner: int | None = None) -> list[Helper]:
    """Start every helper and wait until each is ready; on failure stop those started.

    ``owner``: the jailed VM's uid, given each helper's socket once it is ready (the
    helpers run as root and make their sockets private; QEMU must still connect).
    """
    started: list[Helper] = []
    try:
        for spec in specs:
            started.append(await start_helper(spec, runtime_dir, env))
            if owner is not None and spec.ready_socket is not None:
                os.chown(spec.ready_socket, owner, owner)
    except BaseException:
        await stop_helpers(started)
        raise
    return started


async def start_helper(spec: HelperSpec, log_dir: Path, env: Mapping[str, str]) -> Helper:
    """Start one helper (its log in ``log_dir``) and wait until it is ready."""
    for d in spec.state_dirs:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = log_dir / f"{spec.name}.log"
    proc = await asyncio.to_thread(
        ManagedProcess.spawn, spec.argv, cwd=log_dir, env=env, stdout=log_path,
        stderr=log_path, pass_fds=())
    helper = Helper(spec.name, proc, log_path)
    try:
        await _wait_ready(spec, proc, log_path)
    except BaseException:
        await stop_helpers([helper])
        raise
    return helper


async def _wait_ready(spec: HelperSpec, proc: ManagedProcess, log_path: Path) -> None:
    deadline = time.monotonic() + spec.start_timeout_s
    exited = proc.wait()
    while time.monotonic() < deadline:
        if exited.done():
            code, _ = exited.result()
            raise LaunchError(f"helper {spec.name} exited before it was ready", exit_code=code,
                              stderr_tail=last_line(_read(log_path)))
        if await asyncio.to_thread(_ready, spec):
            return
        # Readiness is a file or socket another process makes: there is no event to wait on.
        await asyncio.sleep(_POLL_S)
    raise LaunchError(f"helper {spec.name} was not ready within {spec.start_timeout_s:g}s",
                      stderr_tail=last_line(_read(log_path)))


def _ready(spec: HelperSpec) -> bool:
    if spec.ready_check is not None and not spec.ready_check():
        return False
    return spec.ready_socket is None or _accepts(spec.ready_socket)


def _accepts(path: Path) -> bool:
    # A connect proves more than the file's existence: the helper is listening.
    # swtpm's control socket takes one client at a time and we close at once.
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-4000:]
    except OSError:
        return ""


def attach_helpers(records: list[HelperRecord]) -> list[Helper]:
    """The recorded helpers that still run (identified by pid and start time)."""
    out = []
    for rec in records:
        proc = ManagedProcess.attach(rec.pid, rec.pid_start_time)
        if proc is not None:
            out.append(Helper(rec.name, proc, Path()))
    return out


async def stop_helpers(helpers: list[Helper]) -> None:
    """SIGTERM each helper, SIGKILL what is left after a grace period, then reap."""
    alive = [h for h in helpers if h.proc.alive()]
    for h in alive:
        h.proc.send_signal(signal.SIGTERM)
    waits = [h.proc.wait() for h in alive]
    if waits:
        _, pending = await asyncio.wait(waits, timeout=STOP_GRACE_S)
        for h in alive:
            if not h.proc.wait().done():
                log.warning("helper %s (pid %d) ignored SIGTERM; killing it", h.name, h.proc.pid)
                h.proc.kill_group()
        if pending:
            await asyncio.wait(pending, timeout=STOP_GRACE_S)
    for h in helpers:
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            h.proc.close()
