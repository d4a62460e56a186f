"""Jailed QEMU processes for the jail tests: spawned the way the runtime spawns QEMU."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.conftest import short_tmp
from vmdriver.jail import dirs, ids
from vmdriver.jail.paths import qemu_ro_paths
from vmdriver.jail.plan import LAUNCH_ENV, SETPRIV, JailSpec, jailed_pid, wrap_argv
from vmdriver.jail.probe import SANDBOX_ARG, probe

QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
#: A QEMU that starts, opens what its options name, and waits on QMP.
IDLE = (QEMU, "-S", "-machine", "none", "-display", "none", "-nodefaults",
        "-no-user-config", "-sandbox", SANDBOX_ARG)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (this host's init reaps slowly)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def processes_of(uid: int) -> list[int]:
    """Live processes running as ``uid``."""
    out = []
    for p in psutil.process_iter(["uids", "status"]):
        uids = p.info.get("uids")
        if uids and uids.real == uid and p.info.get("status") != psutil.STATUS_ZOMBIE:
            out.append(p.pid)
    return out


@dataclass
class Jailed:
    """One jailed QEMU: the tracked (bwrap monitor) pid, QEMU's pid, its QMP socket."""

    proc: subprocess.Popen[bytes]
    qemu_pid: int
    spec: JailSpec
    qmp: socket.socket
    stderr: Path
    greeting: bytes = b""
    _buf: bytes = field(default=b"", repr=False)

    def command(self, name: str, timeout: float = 30.0) -> dict[str, object]:
        """Send one QMP command and return its reply (events are skipped)."""
        self.qmp.sendall(json.dumps({"execute": name}).encode() + b"\n")
        deadline = time.monotonic() + timeout
        self.qmp.settimeout(timeout)
        while time.monotonic() < deadline:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                msg = json.loads(line)
                if "return" in msg or "error" in msg:
                    return dict(msg)
            chunk = self.qmp.recv(65536)
            if not chunk:
                raise EOFError("QMP closed")
            self._buf += chunk
        raise TimeoutError(name)

    def read_greeting(self, timeout: float = 30.0) -> bytes:
        self.qmp.settimeout(timeout)
        while b"\n" not in self._buf:
            chunk = self.qmp.recv(65536)
            if not chunk:
                raise EOFError(self.stderr.read_text(errors="replace"))
            self._buf += chunk
        self.greeting, self._buf = self._buf.split(b"\n", 1)
        return self.greeting

    def kill(self) -> None:
        """SIGKILL the tracked pid, reap it, and wait for QEMU to be gone."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while alive(self.qemu_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.qmp.close()


def spawn(argv: tuple[str, ...], spec: JailSpec, workdir: Path, *, jail: bool = True,
          extra_fds: tuple[int, ...] = ()) -> Jailed:
    """Spawn ``argv`` like the runtime does (pass_fds, own process group, umask 0177),
    with QMP on an inherited socketpair; jailed by ``spec`` unless ``jail`` is false."""
    ours, theirs = socket.socketpair()
    theirs.set_inheritable(True)
    fd = theirs.fileno()
    full = (*argv, "-chardev", f"socket,id=qmp,fd={fd}", "-mon", "chardev=qmp,mode=control")
    spec = dataclasses.replace(spec, fds=(*spec.fds, fd, *extra_fds))
    stderr = workdir / f"stderr.{time.monotonic_ns()}"
    err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        proc = subprocess.Popen(
            wrap_argv(full, spec) if jail else full, env=dict(LAUNCH_ENV),
            stdin=subprocess.DEVNULL, stdout=err, stderr=err, pass_fds=spec.pass_fds,
            process_group=0, umask=0o177, cwd="/")
    finally:
        os.close(err)
        theirs.close()
    qemu = (jailed_pid(proc.pid) if jail else proc.pid) or -1
    return Jailed(proc, qemu, spec, ours, stderr)


@pytest.fixture(scope="session")
def jail_ready() -> None:
    """Skip unless this host can jail QEMU the way the runtime would (as root)."""
    if os.geteuid() != 0:
        pytest.skip("jail tests switch to per-VM uids: they need root")
    support = probe(QEMU)
    if not support.available:
        pytest.skip(f"this host cannot build a jail: {'; '.join(support.problems)}")


@dataclass
class VmDirs:
    """A VM's private dirs under a 0700 root-owned state dir, and its uid lease."""

    root: Path
    run: Path
    lease: ids.IdLease
    spec: JailSpec


def make_vm(state: Path, vm_id: str, *, ro_paths: tuple[str, ...] = (),
            share_net: bool = False, devices: tuple[str, ...] = (),
            userns: bool = True) -> VmDirs:
    """Lease a uid for ``vm_id``, make its run dir and hand it over (prepare_dirs)."""
    lease = ids.allocate(vm_id, state / "uids")
    run = state / vm_id / "run"
    run.mkdir(parents=True, mode=0o700)
    (state / vm_id).chmod(0o700)
    spec = JailSpec(uid=lease.uid, gid=lease.gid,
                    ro_paths=(*qemu_ro_paths(QEMU, (SETPRIV,)), *ro_paths),
                    rw_paths=(str(run),), chdir=str(run), share_net=share_net,
                    devices=devices, userns=userns)
    dirs.prepare_dirs(spec)
    return VmDirs(state / vm_id, run, lease, spec)


@pytest.fixture
def state() -> Iterator[Path]:
    """A 0700 state dir like /var/lib/vmdriver: nothing under it is reachable by a VM uid."""
    with short_tmp("vmdj-") as path:
        yield path
