"""Runtime changes applied to the running VM over QMP, VM-Operator's way.

- RAM: ``balloon`` with the target in bytes.
- CPUs: ``query-hotpluggable-cpus``; a free slot (no ``qom-path``) is filled with
  ``device_add`` of its ``type`` and ``props`` and the id ``cpu-<n>`` (the next unused
  n); CPUs are removed with ``device_del``, newest first, and only the hot-plugged
  ones (``/machine/peripheral/cpu-*``), so the boot CPU stays.
- CD-ROMs ``cd0``...: ``blockdev-open-tray`` without force, then, once the tray is
  open, ``blockdev-change-medium`` (read-only raw) or ``blockdev-remove-medium``. A
  guest that locked the tray (a mounted CD) gets QEMU's eject request and the change
  waits: it stays pending, and the tray is asked again once the guest unlocks it.
  VM-Operator waits for ``DEVICE_TRAY_MOVED``; the supervisor gives faces no QMP
  events, so the tray is read with ``query-block`` instead (every
  :data:`TRAY_POLL_S` while a change is pending).
- ``system_reset`` when ``resetCounter`` was increased.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from vmdriver.errors import MonitorError

log = logging.getLogger(__name__)

Qmp = Callable[[str, dict[str, Any] | None], Awaitable[Any]]
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


async def count_cpus(qmp: Qmp) -> int:
    """vCPUs the VM has now (slots with a CPU in them)."""
    return sum(1 for s in await qmp("query-hotpluggable-cpus", None) if "qom-path" in s)


async def set_cpus(qmp: Qmp, target: int) -> int:
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


async def tray(qmp: Qmp, cd: str) -> dict[str, Any]:
    """``query-block``'s entry for the CD-ROM device ``cd``."""
    for block in await qmp("query-block", None):
        if _device_id(block) == cd:
            return dict(block)
    raise MonitorError(f"no CD-ROM {cd!r} in this VM")


class Media:
    """Pending CD-ROM changes, each applied when its tray is open."""

    def __init__(self, qmp: Qmp, on_change: Callable[[], None]) -> None:
        self.qmp, self.on_change = qmp, on_change
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
                except MonitorError as exc:
                    log.error("%s: medium change failed: %s", cd, exc)  # noqa: TRY400
                    self.wanted.pop(cd, None)
                    self.waiting.pop(cd, None)
                    self.on_change()
            if self.wanted:
                await asyncio.sleep(TRAY_POLL_S)

    async def _step(self, cd: str, asked: set[str]) -> None:
        state = await tray(self.qmp, cd)
        if state.get("tray_open"):
            await self._swap(cd, self.wanted.pop(cd))
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

    async def _swap(self, cd: str, image: str | None) -> None:
        if image is None:
            await self.qmp("blockdev-remove-medium", {"id": cd})
            await self.qmp("blockdev-close-tray", {"id": cd})
            log.info("%s: medium ejected", cd)
            return
        await self.qmp("blockdev-change-medium", {"id": cd, "filename": image, "format": "raw",
                                                  "read-only-mode": "read-only"})
        log.info("%s: medium changed to %s", cd, image)
