"""Runtime changes applied to the running VM over QMP, VM-Operator's way.

- RAM: ``balloon`` with the target in bytes.
- CPUs: ``query-hotpluggable-cpus``; a free slot (no ``qom-path``) is filled with
  ``device_add`` of its ``type`` and ``props`` and the id ``cpu-<n>`` (the next unused
  n); CPUs are removed with ``device_del``, newest first, and only the hot-plugged
  ones (``/machine/peripheral/cpu-*``), so the boot CPU stays.
- CD-ROMs ``cd0``...: ``blockdev-open-tray`` without force, then, once the tray is
  open, ``blockdev-change-medium`` (read-only raw) or ``blockdev-remove-medium``. The
  runner opens the new image and hands QEMU the fd (``add-fd``: a jailed QEMU cannot
  open host paths), and frees the previous medium's fd set (``remove-fd``). A
  guest that locked the tray (a mounted CD) gets QEMU's eject request and the change
  waits: it stays pending, and the tray is asked again once the guest unlocks it.
  VM-Operator waits for ``DEVICE_TRAY_MOVED``; the supervisor gives faces no QMP
  events, so the tray is read with ``query-block`` instead (every
  :data:`TRAY_POLL_S` while a change is pending).
- ``system_reset`` when ``resetCounter`` was increased.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

from vmdriver.errors import MonitorError
from vmdriver.runtime.request import QmpCall

log = logging.getLogger(__name__)

#: Hands QEMU an open file; the ``/dev/fdset/N`` path that names it there.
AddFd = Callable[[int], Awaitable[str]]
_FDSET = "/dev/fdset/"
#: Seconds between tray checks while a medium change waits.
TRAY_POLL_S = 0.5
_PLUGGED = "/machine/peripheral/cpu-"
LOCKED = "tray locked by the guest"


def _slot_key(slot: dict[str, Any]) -> tuple[int, ...]:
    props = slot.get("props", {})
    return tuple(int(props.get(k, 0)) for k in ("socket-id", "die-id", "core-id", "thread-id"))


def _plugged_number(slot: dict[str, Any]) -> int | None:
    match = re.fullmatch(re.escape(_PLUGGED) + r"(\d+)", str(slot.get("qom-path", "")))
    return int(match.group(1)) if match else None


async def count_cpus(qmp: QmpCall) -> int:
    """vCPUs the VM has now (slots with a CPU in them)."""
    return sum(1 for s in await qmp("query-hotpluggable-cpus", None) if "qom-path" in s)


async def set_cpus(qmp: QmpCall, target: int) -> int:
    """Hot-plug or unplug vCPUs towards ``target``; the count QEMU reports afterwards.

    An unplug completes when the guest has let the CPU go (ACPI eject), so the count
    may lag behind; the next status update shows it.
    """
    slots = list(await qmp("query-hotpluggable-cpus", None))
    used = [s for s in slots if "qom-path" in s]
    numbers = {n for s in used if (n := _plugged_number(s)) is not None}
    if target > len(used):
        free = sorted((s for s in slots if "qom-path" not in s), key=_slot_key)
        for slot in free[:target - len(used)]:
            n = next(i for i in range(1, len(slots) + 1) if i not in numbers)
            numbers.add(n)
            await qmp("device_add", {"driver": slot["type"], "id": f"cpu-{n}",
                                     **slot.get("props", {})})
    elif target < len(used):
        plugged = sorted((s for s in used if _plugged_number(s) is not None),
                         key=lambda s: _plugged_number(s) or 0, reverse=True)
        for slot in plugged[:len(used) - target]:
            await qmp("device_del", {"id": f"cpu-{_plugged_number(slot)}"})
    return await count_cpus(qmp)


def _device_id(block: dict[str, Any]) -> str:
    # -blockdev drives have no legacy name: the device is named by its qdev path.
    qdev = str(block.get("qdev", ""))
    return block.get("device") or qdev.removeprefix("/machine/peripheral/").split("/")[0]


async def tray(qmp: QmpCall, cd: str) -> dict[str, Any]:
    """``query-block``'s entry for the CD-ROM device ``cd``."""
    for block in await qmp("query-block", None):
        if _device_id(block) == cd:
            return dict(block)
    raise MonitorError(f"no CD-ROM {cd!r} in this VM")


class Media:
    """Pending CD-ROM changes, each applied when its tray is open."""

    def __init__(self, qmp: QmpCall, on_change: Callable[[], None], add_fd: AddFd | None = None) -> None:
        """``add_fd``: pass images to QEMU as fds; without it QEMU opens them by path."""
        self.qmp, self.on_change, self.add_fd = qmp, on_change, add_fd
        #: cd id -> the wanted image (``None``: empty).
        self.wanted: dict[str, str | None] = {}
        #: cd id -> why it waits (shown in the status as pending).
        self.waiting: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def pending(self) -> tuple[str, ...]:
        """Changes not applied yet, for status.json."""
        return tuple(f"{cd}: {why}" for cd, why in sorted(self.waiting.items()))

    def change(self, cd: str, image: str | None) -> None:
        """Ask for ``image`` in ``cd`` (``None`` ejects); applied in the background."""
        self.wanted[cd] = image
        self.waiting[cd] = "waiting for the tray to open"
        self.on_change()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="runner CD-ROM changes")

    async def close(self) -> None:
        """Stop waiting (the VM is going away)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        asked: set[str] = set()
        while self.wanted:
            for cd in list(self.wanted):
                try:
                    await self._step(cd, asked)
                except (MonitorError, OSError) as exc:
                    why = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) else exc
                    log.error("%s: medium change failed: %s", cd, why)  # noqa: TRY400
                    if isinstance(exc, OSError):  # the image: the old medium stays in
                        with contextlib.suppress(MonitorError):
                            await self.qmp("blockdev-close-tray", {"id": cd})
                    self.wanted.pop(cd, None)
                    self.waiting.pop(cd, None)
                    self.on_change()
            if self.wanted:
                await asyncio.sleep(TRAY_POLL_S)

    async def _step(self, cd: str, asked: set[str]) -> None:
        state = await tray(self.qmp, cd)
        if state.get("tray_open"):
            await self._swap(cd, self.wanted.pop(cd), state.get("inserted") or {})
            asked.discard(cd)
            self.waiting.pop(cd, None)
            self.on_change()
            return
        if cd not in asked:
            # Without force: a locked tray gets an eject request, as a button press would.
            await self.qmp("blockdev-open-tray", {"id": cd})
            asked.add(cd)
        elif state.get("locked"):
            if self.waiting.get(cd) != LOCKED:
                log.info("%s: the guest holds the tray locked; the change waits", cd)
                self.waiting[cd] = LOCKED
                self.on_change()
        elif self.waiting.get(cd) == LOCKED:
            asked.discard(cd)  # the guest let go of the closed tray: ask again

    async def _swap(self, cd: str, image: str | None, previous: dict[str, Any]) -> None:
        if image is None:
            await self.qmp("blockdev-remove-medium", {"id": cd})
            await self.qmp("blockdev-close-tray", {"id": cd})
            log.info("%s: medium ejected", cd)
        else:
            filename = await self._hand_over(image)
            try:
                await self.qmp("blockdev-change-medium", {"id": cd, "filename": filename,
                                                          "format": "raw",
                                                          "read-only-mode": "read-only"})
            except MonitorError:
                await self._release(filename if filename != image else None)
                raise
            log.info("%s: medium changed to %s", cd, image)
        await self._drop(previous)

    async def _hand_over(self, image: str) -> str:
        """The name QEMU opens ``image`` by: an fd set holding our read-only fd of it."""
        if self.add_fd is None:
            return image
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return await self.add_fd(fd)
        finally:
            os.close(fd)  # QEMU has its own copy

    async def _drop(self, medium: dict[str, Any]) -> None:
        """Close the medium taken out: the launch's is a pair of ``-blockdev`` nodes
        (``<id>``, ``<id>-file``) that QEMU keeps until deleted; then free its fd set."""
        if self.add_fd is None:
            return
        node = str(medium.get("node-name", ""))
        if node and not node.startswith("#"):  # "#block…": QEMU's own, freed by QEMU
            for name in (node, f"{node}-file"):
                with contextlib.suppress(MonitorError):
                    await self.qmp("blockdev-del", {"node-name": name})
        await self._release(medium.get("file"))

    async def _release(self, filename: str | None) -> None:
        """Free the fd set of a medium QEMU no longer uses (it closes it once unused)."""
        if self.add_fd is None or not filename or not filename.startswith(_FDSET):
            return
        with contextlib.suppress(MonitorError, ValueError):
            await self.qmp("remove-fd", {"fdset-id": int(filename.removeprefix(_FDSET))})
