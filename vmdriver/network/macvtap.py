"""macvtap NICs: a macvtap link on a host device, QEMU gets the /dev/tapN fd.

The guest then sits directly on the device's network (no bridge, no NAT). The
link carries the guest's MAC, because macvtap delivers only frames for it.
Unlike a tun tap, a macvtap link persists after its fds close, so it is
removed explicitly on stop and by reconcile after a crash.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from vmdriver.errors import HostError, SpecError
from vmdriver.network.bridge import sysctl
from vmdriver.network.tap import Tap, ipr, tap_flags

MODES = ("bridge", "private", "vepa", "passthru")
#: Nomad/nomad-driver-virt spell it ``passthrough``; the kernel ``passthru``.
_MODE_ALIASES = {"passthrough": "passthru"}


def kernel_mode(mode: str) -> str:
    """The kernel's name for a macvtap mode, or SpecError."""
    kmode = _MODE_ALIASES.get(mode, mode)
    if kmode not in MODES:
        raise SpecError("unknown macvtap mode", where="macvtap.mode", value=mode,
                        allowed="bridge, private, vepa, passthrough")
    return kmode


def create_macvtap(name: str, device: str, *, mac: str, mode: str = "bridge", alias: str = "") -> Tap:
    """Create macvtap ``name`` on ``device`` with the guest's MAC, up, and open its fd."""
    kmode = kernel_mode(mode)
    with ipr() as sock:
        found = sock.link_lookup(ifname=device)
        if not found:
            raise HostError(f"host device {device} does not exist")
        stale = sock.link_lookup(ifname=name)
        if stale:
            with contextlib.suppress(NetlinkError):
                sock.link("del", index=stale[0])
        try:
            sock.link("add", ifname=name, kind="macvtap", link=found[0], macvtap_mode=kmode,
                      address=mac)
        except NetlinkError as exc:
            if exc.code == errno.EOPNOTSUPP:
                raise HostError("this kernel has no macvtap support (CONFIG_MACVTAP)") from None
            raise HostError(f"cannot create macvtap {name} on {device}: {exc}") from None
        ifindex = int(sock.link_lookup(ifname=name)[0])
        try:
            # The link carries the guest's MAC: left alone, the host would give it the
            # guest's own EUI-64 link-local address (the guest's duplicate address
            # detection then fails) and send router solicitations in the guest's name.
            sysctl(f"net.ipv6.conf.{name}.disable_ipv6", "1")
            sock.link("set", index=ifindex, state="up", ifalias=alias or name)
            fd = open_macvtap_fd(name, ifindex)
        except BaseException:
            with contextlib.suppress(NetlinkError):
                sock.link("del", index=ifindex)
            raise
    return Tap(name=name, ifindex=ifindex, mac=mac, fds=(fd,), kind="macvtap")


def open_macvtap_fd(name: str, ifindex: int) -> int:
    """Open the character device of a macvtap link and check it is that link.

    The node is ``/dev/tap<ifindex>``, created by devtmpfs. devtmpfs is shared by
    every network namespace while ifindexes are per namespace, so two namespaces'
    macvtaps can want the same node name: the fd's own TUNGETIFF answer decides,
    and on a clash a private node is made from the link's own device numbers.
    """
    node = Path(f"/dev/tap{ifindex}")
    try:
        fd = os.open(node, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        problem = f"cannot open {node} for macvtap {name}: {exc.strerror}"
    else:
        got = _owner(fd)
        if got == name:
            return fd
        os.close(fd)
        problem = f"{node} belongs to {got or 'no macvtap'}, not {name}"
    private = _private_node(name, ifindex)
    if private is None:
        raise HostError(f"{problem} (an ifindex clash across network namespaces)")
    return private


def _owner(fd: int) -> str:
    try:
        return tap_flags(fd)[0] if stat.S_ISCHR(os.fstat(fd).st_mode) else ""
    except OSError:
        return ""


def _private_node(name: str, ifindex: int) -> int | None:
    """Open the link's device through a node of our own, made from the ``major:minor``
    this namespace's sysfs gives for it; ``None`` where sysfs does not show the link."""
    dev = Path(f"/sys/class/net/{name}/macvtap/tap{ifindex}/dev")
    try:
        major, minor = (int(x) for x in dev.read_text().strip().split(":"))
    except (OSError, ValueError):
        return None
    with tempfile.TemporaryDirectory(prefix="vmd-macvtap-") as tmp:
        node = os.path.join(tmp, "tap")
        os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(major, minor))
        fd = os.open(node, os.O_RDWR | os.O_CLOEXEC)
    if _owner(fd) != name:
        os.close(fd)
        return None
    return fd
