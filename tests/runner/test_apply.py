"""The QMP sequences of runtime changes, against a QEMU stand-in that keeps slot and tray
state the way QEMU reports it (the real QEMU runs in test_run.py; these cover the branches
a boot cannot reach cheaply: unplug order, id reuse, a tray the guest keeps locked)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from vmdriver.errors import MonitorError
from vmdriver.runner import apply


class FakeCpus:
    """query-hotpluggable-cpus for 1 socket x 4 cores, the boot CPU in core 0."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any] | None]] = []
        self.slots: list[dict[str, Any]] = [
            {"type": "max-x86_64-cpu", "vcpus-count": 1,
             "props": {"socket-id": 0, "core-id": core, "thread-id": 0}} for core in (3, 2, 1, 0)]
        self.slots[3]["qom-path"] = "/machine/unattached/device[0]"

    async def __call__(self, cmd: str, args: dict[str, Any] | None) -> Any:
        self.calls.append((cmd, args))
        if cmd == "query-hotpluggable-cpus":
            return [dict(s) for s in self.slots]
        assert args is not None
        if cmd == "device_add":
            slot = next(s for s in self.slots if s["props"]["core-id"] == args["core-id"])
            assert "qom-path" not in slot
            slot["qom-path"] = f"/machine/peripheral/{args['id']}"
        elif cmd == "device_del":
            slot = next(s for s in self.slots if s.get("qom-path") == f"/machine/peripheral/{args['id']}")
            del slot["qom-path"]
        return {}


def test_hotplug_fills_free_slots_in_order_with_cpu_n_ids() -> None:
    qmp = FakeCpus()
    assert asyncio.run(apply.set_cpus(qmp, 3)) == 3
    added = [a for c, a in qmp.calls if c == "device_add"]
    assert added == [
        {"driver": "max-x86_64-cpu", "id": "cpu-1", "socket-id": 0, "core-id": 1, "thread-id": 0},
        {"driver": "max-x86_64-cpu", "id": "cpu-2", "socket-id": 0, "core-id": 2, "thread-id": 0}]


def test_unplug_removes_the_newest_and_never_the_boot_cpu() -> None:
    qmp = FakeCpus()
    asyncio.run(apply.set_cpus(qmp, 4))
    qmp.calls.clear()
    assert asyncio.run(apply.set_cpus(qmp, 1)) == 1
    assert [a["id"] for c, a in qmp.calls if c == "device_del" and a] == ["cpu-3", "cpu-2", "cpu-1"]
    # A freed number is used again.
    asyncio.run(apply.set_cpus(qmp, 2))
    assert [a["id"] for c, a in qmp.calls if c == "device_add" and a] == ["cpu-1"]
    assert asyncio.run(apply.set_cpus(qmp, 0)) == 1  # the boot CPU stays


class FakeTray:
    """query-block and the tray commands of one ide-cd ``cd0``."""

    def __init__(self, *, locked: bool) -> None:
        self.locked, self.open, self.file = locked, False, "/dev/fdset/1"
        self.calls: list[str] = []
        self.removed: list[int] = []
        self.deleted: list[str] = []
        #: The launch's medium is the -blockdev node "cd0"; QEMU names the ones it opens.
        self.node = "cd0"

    async def __call__(self, cmd: str, args: dict[str, Any] | None) -> Any:
        self.calls.append(cmd)
        if cmd == "remove-fd":
            assert args is not None
            self.removed.append(args["fdset-id"])
            return {}
        if cmd == "blockdev-del":
            assert args is not None
            self.deleted.append(args["node-name"])
            return {}
        if cmd == "query-block":
            inserted = {"inserted": {"file": self.file, "node-name": self.node}} if self.file else {}
            return [{"device": "", "qdev": "/machine/peripheral/disk0/virtio-backend"},
                    {"device": "", "qdev": "cd0", "tray_open": self.open, "locked": self.locked,
                     **inserted}]
        assert args is not None and args["id"] == "cd0"
        if cmd == "blockdev-open-tray" and not self.locked:
            self.open = True
        elif cmd == "blockdev-change-medium":
            self.file, self.open, self.node = args["filename"], False, "#block123"
        elif cmd == "blockdev-remove-medium":
            self.file = ""
        elif cmd == "blockdev-close-tray":
            self.open = False
        return {}



def test_locked_tray_defers_the_change_until_the_guest_lets_go(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apply, "TRAY_POLL_S", 0.01)
    tray = FakeTray(locked=True)
    changes: list[tuple[str, ...]] = []

    async def scenario() -> None:
        media = apply.Media(tray, lambda: changes.append(media.pending()))
        media.change("cd0", "/srv/b.iso")
        await asyncio.sleep(0.1)
        assert media.pending() == ("cd0: tray locked by the guest",)
        assert tray.file == "/dev/fdset/1" and tray.calls.count("blockdev-open-tray") == 1
        tray.locked = False  # the guest unmounted the CD: the tray is asked again
        await asyncio.sleep(0.1)
        assert tray.file == "/srv/b.iso" and media.pending() == ()
        assert tray.calls.count("blockdev-open-tray") == 2
        media.change("cd0", None)  # eject
        await asyncio.sleep(0.1)
        assert tray.file == "" and not tray.open
        await media.close()

    asyncio.run(scenario())
    assert ("cd0: waiting for the tray to open",) in changes


def test_images_reach_qemu_as_fd_sets_and_old_sets_are_freed(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With ``add_fd`` (the runner's way): the image is opened here and QEMU gets the fd;
    the fd set of the medium replaced (and of one ejected) is removed."""
    monkeypatch.setattr(apply, "TRAY_POLL_S", 0.01)
    image = tmp_path / "b.iso"
    image.write_bytes(b"B" * 2048)
    tray = FakeTray(locked=False)
    handed: list[bytes] = []

    async def add_fd(fd: int) -> str:
        handed.append(os.pread(fd, 4, 0))  # the fd is open on the image while QEMU takes it
        return f"/dev/fdset/{len(handed) + 1}"

    async def scenario() -> None:
        media = apply.Media(tray, lambda: None, add_fd)
        media.change("cd0", str(image))
        await asyncio.sleep(0.1)
        assert (tray.file, tray.removed, handed) == ("/dev/fdset/2", [1], [b"BBBB"])
        assert tray.deleted == ["cd0", "cd0-file"]  # the launch's nodes held a.iso open
        media.change("cd0", str(tmp_path / "missing.iso"))  # cannot be opened: reported, dropped
        await asyncio.sleep(0.1)
        assert tray.file == "/dev/fdset/2" and media.pending() == () and not tray.open
        media.change("cd0", None)
        await asyncio.sleep(0.1)
        assert (tray.file, tray.removed, tray.deleted) == ("", [1, 2], ["cd0", "cd0-file"])
        await media.close()

    asyncio.run(scenario())


def test_unknown_cd_is_reported_and_dropped() -> None:
    async def scenario() -> tuple[str, ...]:
        media = apply.Media(FakeTray(locked=False), lambda: None)
        media.change("cd7", "/srv/x.iso")
        await asyncio.sleep(0.05)
        await media.close()
        return media.pending()

    assert asyncio.run(scenario()) == ()
    with pytest.raises(MonitorError, match="no CD-ROM 'cd7'"):
        asyncio.run(apply.tray(FakeTray(locked=False), "cd7"))
