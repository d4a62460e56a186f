"""The peer: libvirt 9 from Debian, started by the benchmark and thrown away after.

libvirtd runs in its own mount namespace with empty tmpfs over its state,
cache, log and run dirs and over ``/etc/libvirt/qemu``, and with our
``qemu.conf`` bind-mounted over the system one, so nothing it does outlives the
run or touches the host's libvirt setup. ``virsh`` talks to it through a socket
in the temp dir. Timings are ``virsh`` invocations, as a user or HashiCorp's
virt driver's CLI path would pay them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

from bench.common import TINY_MIB
from vmdriver.errors import last_line

LIBVIRTD_CONF = """\
unix_sock_dir = "{run}"
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:{root}/libvirtd.log"
"""

# Root user, no security driver and no cgroups: the container this runs in has
# none to offer, and the bare and vmdriver arms do not use them either.
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
namespaces = [ ]
cgroup_controllers = [ ]
"""

START_SH = """\
set -e
for d in /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt /etc/libvirt/qemu; do
    mkdir -p "$d"; mount -t tmpfs tmpfs "$d"
done
mkdir -p /var/lib/libvirt/qemu /var/log/libvirt/qemu /var/cache/libvirt/qemu
mount --bind {root}/qemu.conf /etc/libvirt/qemu.conf
exec libvirtd --config {root}/libvirtd.conf
"""

#: The tiny VM of start/burst/stop, as a transient domain (libvirt adds -nodefaults itself).
DOMAIN_XML = """\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>{emulator}</emulator>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def unavailable() -> str | None:
    """Why libvirt cannot be compared here, or ``None``."""
    for tool in ("libvirtd", "virsh", "unshare"):
        if shutil.which(tool) is None:
            hint = " (apt-get install libvirt-daemon-system libvirt-clients)" if tool != "unshare" else ""
            return f"{tool} not installed{hint}"
    if os.geteuid() != 0:
        return "libvirtd with a throwaway system config needs root"
    if not Path("/etc/libvirt/qemu.conf").exists():
        return "/etc/libvirt/qemu.conf missing (libvirt-daemon-driver-qemu not installed)"
    return None


class Libvirt:
    """A private libvirtd and the ``virsh`` calls the benchmarks time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"qemu:///system?socket={root}/run/libvirt-sock"
        self._proc: asyncio.subprocess.Process | None = None
        self._emulator = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"

    async def start(self, timeout: float = 30.0) -> None:
        """Start libvirtd and wait until ``virsh`` gets an answer."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "run").mkdir(exist_ok=True)
        (self.root / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(run=self.root / "run", root=self.root))
        (self.root / "qemu.conf").write_text(QEMU_CONF)
        (self.root / "start.sh").write_text(START_SH.format(root=self.root))
        log = (self.root / "libvirtd.out").open("wb")
        # unshare execs (no fork), so this pid is libvirtd's own.
        self._proc = await asyncio.create_subprocess_exec(
            "unshare", "-m", "--propagation", "private", "sh", str(self.root / "start.sh"),
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                raise RuntimeError(f"libvirtd exited: {self._tail()}")
            if (self.root / "run" / "libvirt-sock").exists() and await self._virsh("version") == 0:
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"libvirtd did not answer within {timeout:.0f}s: {self._tail()}")

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return last_line((self.root / "libvirtd.out").read_text()) or "no output"
        return "no output"

    async def _virsh(self, *args: str) -> int:
        proc = await asyncio.create_subprocess_exec(
            "virsh", "-q", "-c", self.uri, *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return await proc.wait()

    def domain_file(self, name: str) -> Path:
        """Write the tiny domain's XML (before any clock starts)."""
        path = self.root / f"{name}.xml"
        path.write_text(DOMAIN_XML.format(name=name, mib=TINY_MIB, emulator=self._emulator))
        return path

    async def create(self, name: str) -> float:
        """``virsh create``: seconds until it returned with the domain running."""
        xml = self.domain_file(name)
        t0 = time.perf_counter()
        rc = await self._virsh("create", str(xml))
        dt = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"virsh create {name} failed (exit {rc}); see {self.root}/libvirtd.log")
        return dt

    async def destroy(self, name: str) -> float:
        """``virsh destroy`` (forced stop): seconds until it returned."""
        t0 = time.perf_counter()
        rc = await self._virsh("destroy", name)
        dt = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"virsh destroy {name} failed (exit {rc})")
        return dt

    async def running(self, name: str) -> bool:
        """True if ``virsh domstate`` says running."""
        proc = await asyncio.create_subprocess_exec(
            "virsh", "-q", "-c", self.uri, "domstate", name,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await proc.communicate()
        return out.strip() == b"running"

    async def stop(self) -> None:
        """Destroy every domain left, then end libvirtd (only the one this object started)."""
        if self._proc is None or self._proc.returncode is not None:
            return
        proc = await asyncio.create_subprocess_exec(
            "virsh", "-q", "-c", self.uri, "list", "--name",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await proc.communicate()
        for name in out.decode().split():
            with contextlib.suppress(RuntimeError):
                await self.destroy(name)
        self._proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._proc.wait(), 15)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
