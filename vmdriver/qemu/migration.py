"""QMP sequences for saving, loading and moving a VM's state, and for freezing its disks.

Every stream goes through a file descriptor vmdriver opened and handed over
with ``getfd`` (SCM_RIGHTS on the QMP socket): QEMU never opens a path or a
socket itself, so ``-sandbox`` and the jail stay as they are. The same
``migrate uri=fd:NAME`` writes a snapshot file or feeds a socket to another
QEMU; the receiving side is a QEMU started with ``-incoming defer``, given
its fd with ``migrate-incoming``.

Disks are frozen with ``blockdev-snapshot``: a new qcow2 overlay (a file
vmdriver created and opened, added with ``add-fd``) goes on top of the drive's
current top node; the old top becomes a read-only backing file.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from vmdriver.errors import MonitorError, SpecError
from vmdriver.qemu.monitor import Monitor

#: The ``getfd`` name of a migration stream.
STREAM_FD = "vmdriver-migrate"
#: Bytes per second: as fast as the fd takes it (QEMU's default caps at 128 MiB/s).
MAX_BANDWIDTH = 64 << 30
#: The longest pause a live migration aims for before it switches over (ms).
DOWNTIME_LIMIT_MS = 300
_POLL_S = 0.01


@dataclass(frozen=True)
class MigrationStats:
    """What ``query-migrate`` says of a finished outgoing migration."""

    #: Wall time from the ``migrate`` command to ``completed``, in seconds, as we saw it.
    seconds: float
    #: QEMU's own total time and the pause of the VM, in milliseconds.
    total_ms: int
    downtime_ms: int | None
    #: Bytes of RAM sent (QEMU's ``ram.transferred``).
    ram_bytes: int

    def mib_per_s(self, size: int) -> float:
        """Throughput of ``size`` bytes over :attr:`seconds`, in MiB/s."""
        return size / (1 << 20) / max(self.seconds, 1e-6)


async def tune(monitor: Monitor, *, live: bool) -> None:
    """Lift the bandwidth cap; for a live migration, bound the pause at the switch-over."""
    params: dict[str, Any] = {"max-bandwidth": MAX_BANDWIDTH}
    if live:
        params["downtime-limit"] = DOWNTIME_LIMIT_MS
    await monitor.execute("migrate-set-parameters", params)


async def check_migratable(monitor: Monitor, what: str, where: str) -> None:
    """Refuse before anything is paused when QEMU would refuse the stream anyway
    (``blocked-reasons``: a mounted 9p share, vhost-user-fs, ...)."""
    info = await monitor.execute("query-migrate")
    blocked = [str(r) for r in info.get("blocked-reasons") or ()]
    if blocked:
        raise SpecError(f"QEMU cannot {what}: {'; '.join(blocked)}", where=where)


async def migrate_out(monitor: Monitor, fd: int, *, timeout: float, live: bool = False) -> MigrationStats:
    """Stream the VM's state into ``fd`` (a file or a socket) and wait until it is all sent.

    QEMU leaves the VM paused (``postmigrate``) when done: the caller decides
    whether it continues (``cont``) or ends.
    """
    await tune(monitor, live=live)
    await monitor.execute_with_fd("getfd", {"fdname": STREAM_FD}, fd)
    t0 = time.monotonic()
    await monitor.execute("migrate", {"uri": f"fd:{STREAM_FD}"})
    info = await _wait_outgoing(monitor, timeout)
    ram = info.get("ram", {})
    return MigrationStats(time.monotonic() - t0, int(info.get("total-time", 0)),
                          info.get("downtime"), int(ram.get("transferred", 0)))


async def _wait_outgoing(monitor: Monitor, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = await monitor.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise MonitorError(f"migration {status}: {info.get('error-desc', 'no reason given')}")
        if time.monotonic() > deadline:
            await cancel(monitor)
            raise MonitorError(f"migration did not finish within {timeout:g}s (status {status})")
        await asyncio.sleep(_POLL_S)


async def cancel(monitor: Monitor) -> None:
    """Cancel an outgoing migration; the VM stays on this side."""
    with contextlib.suppress(MonitorError):
        await monitor.execute("migrate_cancel")


async def migrate_in(monitor: Monitor, fd: int, *, timeout: float) -> float:
    """Load a state stream from ``fd`` into a QEMU started with ``-incoming defer``.

    Returns the seconds it took. QEMU (started with ``-S``) stays paused until
    ``cont``. A stream QEMU cannot load makes it exit: that surfaces here as a
    :class:`MonitorError` (the caller adds QEMU's own last words).
    """
    t0 = time.monotonic()
    await start_incoming(monitor, fd)
    await wait_incoming(monitor, timeout=timeout)
    return time.monotonic() - t0


async def start_incoming(monitor: Monitor, fd: int) -> None:
    """Hand ``fd`` to a QEMU waiting with ``-incoming defer``; it starts reading at once."""
    # Images are activated (locked for writing) at `cont`, not when the stream ends:
    # the source of a live migration still holds them until then.
    await monitor.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "late-block-activate", "state": True}]})
    await monitor.execute_with_fd("getfd", {"fdname": STREAM_FD}, fd)
    await monitor.execute("migrate-incoming", {"uri": f"fd:{STREAM_FD}"})


async def wait_incoming(monitor: Monitor, *, timeout: float) -> None:
    """Wait until the incoming stream is loaded (QEMU leaves ``inmigrate``)."""
    deadline = time.monotonic() + timeout
    while True:
        status = (await monitor.execute("query-status"))["status"]
        if status != "inmigrate":
            break
        if time.monotonic() > deadline:
            raise MonitorError(f"loading the state did not finish within {timeout:g}s")
        await asyncio.sleep(_POLL_S)
    info = await monitor.execute("query-migrate")
    if info.get("status") == "failed" or status not in ("paused", "prelaunch", "running"):
        raise MonitorError(f"loading the state failed (QEMU status {status}): "
                           f"{info.get('error-desc', 'no reason given')}")


async def announce(monitor: Monitor) -> None:
    """Have the NICs announce the guest (RARP, and a gratuitous ARP from a virtio-net guest).

    A restored guest's peers have no ARP entry for it yet: user-mode networking
    drops the first forwarded SYN while it asks, and the client waits a
    retransmit (~1 s) for its first answer.
    """
    with contextlib.suppress(MonitorError):
        await monitor.execute("announce-self", {"initial": 50, "max": 550, "rounds": 3,
                                                "step": 100})


# Section: disks


@dataclass(frozen=True)
class BlockTop:
    """The node a drive's device uses now, and what it is."""

    drive_id: str
    node: str
    format: str
    virtual_size: int


async def drive_tops(monitor: Monitor) -> dict[str, BlockTop]:
    """Per device id: the top block node of its medium (empty trays left out)."""
    out = {}
    for entry in await monitor.execute("query-block"):
        inserted = entry.get("inserted")
        drive_id = _device_id(str(entry.get("qdev", "")), str(entry.get("device", "")))
        if not inserted or not drive_id:
            continue
        image = inserted.get("image", {})
        out[drive_id] = BlockTop(drive_id, inserted["node-name"], str(inserted.get("drv", "")),
                                 int(image.get("virtual-size", 0)))
    return out


def _device_id(qdev: str, device: str) -> str:
    # `-device ...,id=X` shows as "X" (IDE) or "/machine/peripheral/X/virtio-backend".
    prefix = "/machine/peripheral/"
    if qdev.startswith(prefix):
        return qdev[len(prefix):].split("/", 1)[0]
    return qdev or device


def new_node_name(drive_id: str) -> str:
    """A fresh node name for an overlay of ``drive_id`` (QEMU allows 31 characters)."""
    return f"{drive_id[:18]}-ov{secrets.token_hex(4)}"


async def push_overlay(monitor: Monitor, top: BlockTop, fds: tuple[int, ...], node: str) -> None:
    """Put the qcow2 file behind ``fds`` (read-only fd first, then read-write) on top of
    ``top``: the device writes to it from now on, ``top`` becomes its backing file.

    The file must already be a qcow2 image whose backing file is ``top``'s image.
    """
    added = await monitor.execute_with_fd("add-fd", {"opaque": node}, fds[0])
    fdset = int(added["fdset-id"])
    for fd in fds[1:]:
        await monitor.execute_with_fd("add-fd", {"fdset-id": fdset, "opaque": node}, fd)
    await monitor.execute("blockdev-add", {"driver": "file", "node-name": f"{node}-file",
                                           "filename": f"/dev/fdset/{fdset}"})
    await monitor.execute("blockdev-add", {"driver": "qcow2", "node-name": node,
                                           "file": f"{node}-file", "backing": None})
    await monitor.execute("blockdev-snapshot", {"node": top.node, "overlay": node})
