"""Helpers to boot the Debian cloud guest and talk to it over SSH.

Reusable by any test that boots guest/cloud (the virt face's end-to-end test
does the same through ``vmdriver run``): :func:`cloud_guest_dir`,
:func:`free_port`, :func:`wait_ssh`, :func:`ssh_run` and :class:`CloudVM`, a
QEMU started directly (TCG) that is killed on every exit path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parents[2]
CLOUD_GUEST_LINK = REPO / "guest" / "cloud" / "out"
#: Printed on the serial console when cloud-init's final stage (runcmd included) is done.
CLOUD_INIT_FINISHED = re.compile(r"Cloud-init v\. \S+ finished at ")
DEFAULT_USER = "debian"
SSH_OPTS = ("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "IdentitiesOnly=yes")


def cloud_guest_dir() -> Path:
    """The built cloud guest (guest/cloud/out); builds it (as root) when missing."""
    if not (CLOUD_GUEST_LINK / "manifest.json").exists():
        if os.geteuid() != 0:
            raise RuntimeError("guest/cloud/out is missing and building it needs root")
        subprocess.run(("bash", str(REPO / "guest" / "cloud" / "build.sh")), check=True,
                       stdout=subprocess.DEVNULL, timeout=1800)
    json.loads((CLOUD_GUEST_LINK / "manifest.json").read_text())
    return CLOUD_GUEST_LINK.resolve()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ssh_keypair(directory: Path) -> tuple[Path, str]:
    """A fresh ed25519 key pair in ``directory``: (private key path, public key line)."""
    key = directory / "id_ed25519"
    subprocess.run(("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vmdriver-test", "-f", str(key)),
                   check=True, timeout=30)
    return key, key.with_suffix(".pub").read_text().strip()


def ssh_run(port: int, key: Path, command: str, *, user: str = DEFAULT_USER, timeout: float = 60.0,
            check: bool = True, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``command`` in the guest with the real ssh client; returns the completed process.

    :param stdin: fed to the command (keeps secrets out of argv and so out of the guest's logs).
    """
    argv = ("ssh", *SSH_OPTS, "-i", str(key), "-p", str(port), f"{user}@127.0.0.1", command)
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=check)


def wait_ssh(port: int, key: Path, *, user: str = DEFAULT_USER, timeout: float = 240.0,
             alive: Iterator[bool] | None = None) -> float:
    """Wait until ``user`` logs in with ``key``; return the seconds waited.

    :param alive: polled between tries; a False ends the wait early (e.g. QEMU died).
    :raise TimeoutError: no login within ``timeout``.
    """
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        if alive is not None and not next(alive):
            raise RuntimeError(f"guest died while waiting for ssh; last ssh error: {last}")
        try:
            proc = ssh_run(port, key, "true", user=user, timeout=15, check=False)
        except subprocess.TimeoutExpired:
            last = "ssh timed out"
        else:
            if proc.returncode == 0:
                return time.monotonic() - start
            last = proc.stderr.strip()
        time.sleep(2)
    raise TimeoutError(f"no ssh login as {user} on port {port} in {timeout:.0f}s; last error: {last}")


@dataclass
class CloudVM:
    """The cloud guest under QEMU/TCG: an overlay on the image, the seed as a CD-ROM,
    user-mode networking with host port ``ssh_port`` forwarded to guest port 22.

    :param shares: (tag, host dir) pairs attached as read-only virtio-9p devices.
    :param virtiofs: (tag, vhost-user socket) pairs attached as vhost-user-fs devices.
    """

    image: Path
    seed: Path
    workdir: Path
    memory_mib: int = 1024
    shares: Sequence[tuple[str, Path]] = ()
    virtiofs: Sequence[tuple[str, Path]] = ()
    ssh_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    _stderr: BinaryIO | None = None

    @property
    def serial_log(self) -> Path:
        return self.workdir / "serial.log"

    def argv(self) -> list[str]:
        overlay = self.workdir / "overlay.qcow2"
        subprocess.run(("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(self.image),
                        str(overlay)), check=True, timeout=60)
        argv = [
            "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-smp", "1", "-m", str(self.memory_mib),
            "-display", "none", "-monitor", "none", "-serial", f"file:{self.serial_log}",
            "-drive", f"file={overlay},if=virtio,format=qcow2",
            "-drive", f"file={self.seed},media=cdrom,readonly=on,format=raw",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device", "virtio-net-pci,netdev=n0",
        ]
        for i, (tag, path) in enumerate(self.shares):
            argv += ["-fsdev", f"local,id=fs{i},path={path},security_model=none,readonly=on",
                     "-device", f"virtio-9p-pci,fsdev=fs{i},mount_tag={tag}"]
        if self.virtiofs:
            # vhost-user needs guest RAM that the daemon can map.
            argv += ["-object", f"memory-backend-memfd,id=mem,size={self.memory_mib}M,share=on",
                     "-numa", "node,memdev=mem"]
        for i, (tag, sock) in enumerate(self.virtiofs):
            argv += ["-chardev", f"socket,id=vfs{i},path={sock}",
                     "-device", f"vhost-user-fs-pci,chardev=vfs{i},tag={tag}"]
        return argv

    def start(self) -> None:
        self._stderr = (self.workdir / "qemu.stderr").open("wb")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._stderr, start_new_session=True)

    def alive(self) -> Iterator[bool]:
        while True:
            yield self.proc is not None and self.proc.poll() is None

    def console(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, pattern: re.Pattern[str], timeout: float) -> float:
        """Seconds until ``pattern`` matches the serial console."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if pattern.search(self.console()):
                return time.monotonic() - start
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited; console tail:\n{self.console()[-2000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"{pattern.pattern!r} not on the console in {timeout:.0f}s; "
                           f"tail:\n{self.console()[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        if self._stderr is not None:
            self._stderr.close()


@contextlib.contextmanager
def virtiofsd(shared: Path, socket_path: Path) -> Iterator[Path]:
    """QEMU's virtiofsd serving ``shared`` on ``socket_path``; stopped on exit."""
    binary = next((p for p in ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd") if Path(p).exists()),
                  shutil.which("virtiofsd"))
    if binary is None:
        raise FileNotFoundError("virtiofsd")
    proc = subprocess.Popen((binary, f"--socket-path={socket_path}", "-o", f"source={shared}",
                             "-o", "cache=none", "-o", "sandbox=chroot"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("virtiofsd did not create its socket")
            time.sleep(0.05)
        yield socket_path
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
