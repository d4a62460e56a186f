"""Taps on bridges: created through /dev/net/tun so vmdriver holds the fd QEMU gets.

QEMU receives an open tap (``-netdev tap,fd=N``) and needs no network
privileges, no ``qemu-bridge-helper`` and no setuid helper. The taps are not
persistent (no TUNSETPERSIST): the kernel deletes a tap when the last fd on it
closes, so a tap never outlives its QEMU, even when vmdriver is killed; only
the bridge attachment is done over netlink (pyroute2).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from vmdriver.errors import HostError
from vmdriver.network import names

TUN_DEVICE = "/dev/net/tun"
VHOST_NET_DEVICE = "/dev/vhost-net"
# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
_IFREQ = "16sH22x"  # struct ifreq: name, flags, the rest of the union


@contextlib.contextmanager
def ipr() -> Iterator[IPRoute]:
    """A netlink socket in the calling thread's network namespace."""
    sock = IPRoute()
    try:
        yield sock
    finally:
        sock.close()


@dataclass
class Tap:
    """An open tap (or macvtap) and the fds QEMU will inherit.

    ``fds`` has one fd per queue; ``vhost_fds`` one per queue when vhost-net is used.
    The owner closes them (:meth:`close`) once QEMU holds its copies.
    """

    name: str
    ifindex: int
    mac: str
    fds: tuple[int, ...]
    vhost_fds: tuple[int, ...] = ()
    kind: str = "tap"
    closed: bool = field(default=False, repr=False)

    def netdev(self, netdev_id: str) -> str:
        """The ``-netdev`` value, assuming QEMU inherits the fds under the same numbers."""
        parts = [f"tap,id={netdev_id}"]
        if len(self.fds) == 1:
            parts.append(f"fd={self.fds[0]}")
        else:
            parts.append("fds=" + ":".join(map(str, self.fds)))
        if self.vhost_fds:
            key = "vhostfd" if len(self.vhost_fds) == 1 else "vhostfds"
            parts.append("vhost=on," + key + "=" + ":".join(map(str, self.vhost_fds)))
        return ",".join(parts)

    def pass_fds(self) -> tuple[int, ...]:
        """Every fd QEMU must inherit."""
        return (*self.fds, *self.vhost_fds)

    def close(self) -> None:
        """Close vmdriver's copies (a tap disappears when QEMU's copies close too)."""
        if self.closed:
            return
        self.closed = True
        for fd in (*self.fds, *self.vhost_fds):
            with contextlib.suppress(OSError):
                os.close(fd)


def vhost_net_status() -> tuple[bool, str]:
    """Whether /dev/vhost-net can be opened, and a one-line reason when not."""
    try:
        fd = os.open(VHOST_NET_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, f"{VHOST_NET_DEVICE} does not exist (no vhost_net module): virtio-net runs in QEMU"
    except OSError as exc:
        return False, f"{VHOST_NET_DEVICE}: {exc.strerror}"
    os.close(fd)
    return True, "vhost-net available"


def _open_queue(name: str, flags: int) -> int:
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise HostError(f"cannot open {TUN_DEVICE}: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack(_IFREQ, name.encode(), flags))
    except OSError as exc:
        os.close(fd)
        raise HostError(f"cannot create tap {name}: {exc.strerror}") from None
    return fd


def tap_mac(guest_mac: str) -> str:
    """The host side's MAC: the guest's with 0xfe first, as libvirt does.

    A bridge without a fixed MAC takes its lowest port's; 0xfe keeps taps from
    ever being that, so a bridge's MAC (and its neighbours' ARP caches) stay put.
    """
    return "fe" + guest_mac[2:]


def _ifindex(name: str) -> int | None:
    """An interface's index in the calling thread's namespace (an ioctl, no netlink dump)."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _require_index(name: str) -> int:
    index = _ifindex(name)
    if index is None:
        raise HostError(f"link {name} vanished after creation")
    return index


def open_tap(name: str, *, guest_mac: str, queues: int = 1, vhost: bool | None = None,
             alias: str = "", bridge: str | None = None) -> Tap:
    """Create tap ``name`` (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR), one fd per queue.

    ``queues`` > 1 sets IFF_MULTI_QUEUE. ``vhost`` None uses vhost-net where the
    host has it; True requires it. A stale link of the same name (left by a
    crash) is deleted first. With ``bridge`` the tap is enslaved to it and up,
    in the same netlink request that sets its MAC and alias.
    """
    if queues < 1:
        raise ValueError("queues must be at least 1")
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
    with ipr() as sock:
        stale = _ifindex(name)
        if stale is not None:
            with contextlib.suppress(NetlinkError):
                sock.link("del", index=stale)
        fds: list[int] = []
        try:
            for _ in range(queues):
                fds.append(_open_queue(name, flags))
            ifindex = _require_index(name)
            _no_host_ipv6(name)
            settings: dict[str, object] = {"address": tap_mac(guest_mac), "ifalias": alias or name}
            if bridge:
                settings |= {"master": bridge_index(sock, bridge), "state": "up"}
            sock.link("set", index=ifindex, **settings)
            vhost_fds = _open_vhost(queues, vhost)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
    return Tap(name=name, ifindex=ifindex, mac=guest_mac, fds=tuple(fds), vhost_fds=vhost_fds)


def _no_host_ipv6(name: str) -> None:
    """No IPv6 for the host on a bridge port (before it goes up): otherwise each tap
    coming up sends duplicate address detection, MLD reports and router
    solicitations, flooded to every guest on the bridge; a burst of 32 VMs paid
    for that. The guests' own IPv6 is bridged as before."""
    with contextlib.suppress(OSError):  # no IPv6 on this host: nothing to switch off
        Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")


def _open_vhost(queues: int, want: bool | None) -> tuple[int, ...]:
    if want is False:
        return ()
    available, reason = vhost_net_status()
    if not available:
        if want:
            raise HostError(f"vhost-net requested: {reason}")
        return ()
    return tuple(os.open(VHOST_NET_DEVICE, os.O_RDWR | os.O_CLOEXEC) for _ in range(queues))


#: (network namespace inode, ifindex) of links known to be bridges: checking the
#: kind is a netlink request, and a VM start should not pay it every time.
_bridges: set[tuple[int, int]] = set()


def bridge_index(sock: IPRoute, bridge: str) -> int:
    """The ifindex of an existing bridge, or HostError."""
    index = _ifindex(bridge)
    if index is None:
        raise HostError(f"bridge {bridge} does not exist on this host")
    key = (os.stat("/proc/thread-self/ns/net").st_ino, index)
    if key in _bridges:
        return index
    info = sock.get_links(index)[0].get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "bridge":
        raise HostError(f"{bridge} is not a bridge")
    _bridges.add(key)
    return index


def attach(tap: Tap, bridge: str) -> None:
    """Enslave the tap to ``bridge`` and bring it up."""
    with ipr() as sock:
        sock.link("set", index=tap.ifindex, master=bridge_index(sock, bridge), state="up")


def link_exists(name: str) -> bool:
    return _ifindex(name) is not None


def remove_link(name: str) -> bool:
    """Delete a link by name; False if it was already gone."""
    with ipr() as sock:
        found = sock.link_lookup(ifname=name)
        if not found:
            return False
        try:
            sock.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise HostError(f"cannot delete link {name}: {exc}") from None
    return True


def vmdriver_links() -> dict[str, str]:
    """vmdriver's tap and macvtap links in this namespace: name → VM key."""
    out: dict[str, str] = {}
    with ipr() as sock:
        for link in sock.get_links():
            ifname = link.get_attr("IFLA_IFNAME")
            key = names.link_key(ifname or "")
            if key is not None:
                out[ifname] = key
    return out


def tap_flags(fd: int) -> tuple[str, int]:
    """TUNGETIFF: the device name and flags an open tap/macvtap fd refers to."""
    raw = fcntl.ioctl(fd, TUNGETIFF, bytes(struct.calcsize(_IFREQ)))
    name, flags = struct.unpack(_IFREQ, raw)
    return name.rstrip(b"\0").decode(), flags
