"""Helpers for tests that boot the test guest."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from vmdriver.host.config import HostConfig
from vmdriver.runtime.request import LaunchRequest
from vmdriver.runtime.taskdir import TaskDir, VMDirs
from vmdriver.spec import Bus, Drive, FileMedium, PortForward, ShutdownPolicy, UserNic, VMSpec

READY = "VMDRIVER-GUEST-READY"
GUEST_HTTP_PORT = 8080


def overlay(guest_dir: Path, dest: Path) -> Path:
    """A private copy-on-write disk over the shared guest image."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                    "-b", str(guest_dir / "disk.qcow2"), str(dest)), check=True)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def guest_spec(name: str, *, mode: str = "normal", graceful: bool = True, timeout: float = 30.0,
               host_port: int | None = None, guest_agent: bool = False) -> VMSpec:
    """A spec that boots the test guest from ``local/disk.qcow2`` in its task dir."""
    args: tuple[str, ...] = ()
    if mode != "normal":
        args = ("-fw_cfg", f"name=opt/vmdriver/mode,string={mode}")
    nics: tuple[UserNic, ...] = ()
    if host_port:
        nics = (UserNic(id="net0", forwards=(PortForward(label="http", host_port=host_port,
                                                         guest_port=GUEST_HTTP_PORT),)),)
    return VMSpec(
        name=name,
        # virtio-blk: SeaBIOS reads the boot files ~2 s faster than over IDE under TCG.
        drives=(Drive(id="disk0", medium=FileMedium(path="local/disk.qcow2", format="qcow2"),
                      bus=Bus.VIRTIO),),
        nics=nics,
        shutdown=ShutdownPolicy(graceful=graceful, timeout_s=timeout),
        guest_agent=guest_agent,
        args=args,
    )


def task_dirs(host: HostConfig, vm_id: str, guest_dir: Path | None) -> VMDirs:
    """A VM's places under the test's state dir, with the guest's disk as an overlay."""
    name = vm_id.rsplit("/", 1)[-1]
    td = TaskDir(host.state_dir / "allocs" / name, name)
    dirs = VMDirs.under(host.state_dir, vm_id, td)
    dirs.create()
    if guest_dir is not None:
        overlay(guest_dir, td.local / "disk.qcow2")
    return dirs


def request(host: HostConfig, vm_id: str, spec: VMSpec, guest_dir: Path | None) -> LaunchRequest:
    """A launch request for ``spec`` with fresh dirs (and the guest's disk, if given)."""
    return LaunchRequest(vm_id=vm_id, spec=spec, dirs=task_dirs(host, vm_id, guest_dir))


def stderr_until(proc: subprocess.Popen[str], word: str, timeout: float = 120) -> list[str]:
    """stderr lines of a running `vmdriver` up to the first one holding ``word``.

    Returns early (without ``word``) if the process closes stderr; pytest-timeout
    bounds a readline that never returns.
    """
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if word in line:
            break
    return lines
