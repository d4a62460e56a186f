"""dnsmasq for a managed network: DHCP (and DNS, router advertisements) on its bridge.

The core's helper-process machinery owns the process: it runs
:func:`dnsmasq_argv` and waits for :func:`is_ready`. :class:`Dnsmasq` runs it
directly for tests and for callers without that machinery. dnsmasq stays in
the foreground (so its owner sees it exit), reads no config file, binds only
the bridge's addresses, and keeps its pid and leases under the network's
state dir, which is how :func:`running_pid` finds it after a crash.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import psutil

from vmdriver.errors import HostError
from vmdriver.network.config import ManagedNetwork

DNSMASQ = "/usr/sbin/dnsmasq"
LEASE_TIME = "1h"


def network_dir(state_dir: Path, net: ManagedNetwork | str) -> Path:
    """``<state_dir>/network/<name>``: pid, leases and log of one network's dnsmasq."""
    name = net if isinstance(net, str) else net.name
    return state_dir / "network" / name


def pid_file(state_dir: Path, net: ManagedNetwork | str) -> Path:
    return network_dir(state_dir, net) / "dnsmasq.pid"


def leases_file(state_dir: Path, net: ManagedNetwork | str) -> Path:
    return network_dir(state_dir, net) / "dnsmasq.leases"


def dnsmasq_argv(net: ManagedNetwork, state_dir: Path, binary: str = DNSMASQ) -> list[str]:
    """The command line of the network's dnsmasq (creates its state dir)."""
    ndir = network_dir(state_dir, net)
    ndir.mkdir(parents=True, exist_ok=True)
    start, end = net.dhcp_range
    argv = [
        binary, "--keep-in-foreground", "--conf-file=/dev/null", "--log-facility=-",
        "--bind-interfaces", f"--interface={net.bridge}", "--except-interface=lo",
        f"--pid-file={pid_file(state_dir, net)}", "--no-hosts", "--strict-order",
    ]
    if net.dhcp:
        argv += [
            f"--dhcp-range={start},{end},{net.subnet.netmask},{LEASE_TIME}",
            f"--dhcp-leasefile={leases_file(state_dir, net)}",
            f"--dhcp-lease-max={net.subnet.num_addresses - 3}",
            "--dhcp-no-override", "--dhcp-authoritative",
            # dnsmasq pings an address before offering it and waits up to 3 s, one
            # client at a time: guests booting together then miss their replies.
            # The network is vmdriver's own; nothing else assigns its addresses.
            "--no-ping",
        ]
    if net.ipv6_subnet is not None:
        # Router advertisements only: guests configure themselves (SLAAC, EUI-64).
        # ra-param: advertise as default router (dnsmasq may send lifetime 0 without
        # an IPv6 default route of its own), every 60 s.
        argv += ["--enable-ra", f"--dhcp-range={net.ipv6_subnet.network_address},ra-only,64",
                 f"--ra-param={net.bridge},60,1800"]
    if not net.dns:
        argv.append("--port=0")
    elif net.domain:
        argv += [f"--domain={net.domain}", f"--local=/{net.domain}/", "--expand-hosts"]
    return argv


def _pid_of(state_dir: Path, net: ManagedNetwork | str) -> int | None:
    try:
        return int(pid_file(state_dir, net).read_text().strip())
    except (OSError, ValueError):
        return None


def running_pid(state_dir: Path, net: ManagedNetwork | str) -> int | None:
    """The pid of this network's dnsmasq if it runs (pid file + command line agree)."""
    pid = _pid_of(state_dir, net)
    if pid is None:
        return None
    want = f"--pid-file={pid_file(state_dir, net)}"
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or want not in proc.cmdline():
            return None
    except psutil.Error:
        return None
    return pid


def is_ready(net: ManagedNetwork, state_dir: Path) -> bool:
    """dnsmasq writes its pid file once its sockets are bound: that is readiness."""
    return running_pid(state_dir, net) is not None


def networks_with_dnsmasq(state_dir: Path) -> list[str]:
    """Names of networks that have a dnsmasq state dir (running or not)."""
    root = state_dir / "network"
    return sorted(p.parent.name for p in root.glob("*/dnsmasq.pid")) if root.is_dir() else []


def kill(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; returns once it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def stop_orphan(state_dir: Path, net: ManagedNetwork | str) -> bool:
    """Stop a network's dnsmasq found by its pid file (after a crash); True if one ran."""
    pid = running_pid(state_dir, net)
    if pid is not None:
        kill(pid)
    pid_file(state_dir, net).unlink(missing_ok=True)
    return pid is not None


def _lease_line(state_dir: Path, net: ManagedNetwork, mac: str) -> list[str] | None:
    try:
        lines = leases_file(state_dir, net).read_text().splitlines()
    except OSError:
        return None
    return next((p for p in map(str.split, lines) if len(p) >= 5 and p[1].lower() == mac.lower()), None)


def release_lease(net: ManagedNetwork, state_dir: Path, mac: str) -> str | None:
    """Send dnsmasq a DHCPRELEASE for this MAC's lease, as the guest would; returns the address.

    Without it a stopped VM's lease lives out its hour and many short-lived VMs
    can exhaust the subnet. The datagram is sent from the host bound to the
    bridge, so dnsmasq (bound to the bridge only) sees it arrive there.
    """
    lease = _lease_line(state_dir, net, mac)
    if lease is None:
        return None
    chaddr = bytes.fromhex(mac.replace(":", ""))
    addr = ipaddress.IPv4Address(lease[2])
    server = net.gateway.ip.packed
    # BOOTP header: op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr,
    # chaddr, sname, file; then the magic cookie and options (53 = RELEASE, 54 = server).
    pkt = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, secrets.randbits(32), 0, 0,
                      addr.packed, bytes(4), bytes(4), bytes(4), chaddr, b"", b"")
    pkt += b"\x63\x82\x53\x63" + bytes([53, 1, 7, 54, 4]) + server
    if lease[4] != "*":  # the client id the guest used, or dnsmasq will not match the lease
        clid = bytes.fromhex(lease[4].replace(":", ""))
        pkt += bytes([61, len(clid)]) + clid
    pkt += b"\xff"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, net.bridge.encode())
        try:
            sock.sendto(pkt, (str(net.gateway.ip), 67))
        except OSError:
            return None
    return str(addr)


class Dnsmasq:
    """Runs a network's dnsmasq itself: the fallback when no helper machinery owns it."""

    def __init__(self, net: ManagedNetwork, state_dir: Path) -> None:
        self.net = net
        self.state_dir = state_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return network_dir(self.state_dir, self.net) / "dnsmasq.log"

    def start(self, timeout: float = 5.0) -> int:
        """Start dnsmasq (stopping a stale one first) and wait until it is ready."""
        stop_orphan(self.state_dir, self.net)
        argv = dnsmasq_argv(self.net, self.state_dir)
        with self.log_path.open("ab") as log:
            # Own session: a Ctrl-C meant for vmdriver must not reach it first.
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not is_ready(self.net, self.state_dir):
            if self.proc.poll() is not None:
                raise HostError(f"dnsmasq for network {self.net.name} exited with "
                                f"{self.proc.returncode}: {self._tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise HostError(f"dnsmasq for network {self.net.name} not ready in {timeout:g}s")
            time.sleep(0.01)
        return self.proc.pid

    def _tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        pid_file(self.state_dir, self.net).unlink(missing_ok=True)
