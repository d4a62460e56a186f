"""Memory snapshots against real QEMU and the test guest: save, clone, refuse what does not fit."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import qemu_processes
from tests.e2e.guest import READY, free_port, request
from tests.snapshots.guestops import counter, http_ok, sh, spec, start_counter
from vmdriver.errors import LaunchError
from vmdriver.host.config import HostConfig
from vmdriver.runtime.console import wait_for_line
from vmdriver.runtime.snapshots import snapshot_recorded
from vmdriver.runtime.snapstore import SnapshotError, SnapshotStore, file_crc32
from vmdriver.runtime.state import VMState
from vmdriver.runtime.supervisor import Supervisor

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]
BOOT_TIMEOUT = 120.0


def _copy_snapshot(store: SnapshotStore, name: str, new: str) -> Path:
    dest = store.root / new
    shutil.copytree(store.root / name, dest)
    meta = (dest / "meta.json").read_text().replace(f'"name": "{name}"', f'"name": "{new}"')
    (dest / "meta.json").write_text(meta)
    return dest


def _set_crc(snap: Path) -> None:
    """Make the meta data's CRC agree with a changed state file (damage QEMU must catch)."""
    import json

    meta = json.loads((snap / "meta.json").read_text())
    meta["state_crc32"] = file_crc32(snap / "state")
    (snap / "meta.json").write_text(json.dumps(meta))


async def _guest_mac(sup: Supervisor, vm_id: str) -> str:
    """The guest's eth0 MAC once it is the one the VM's spec gives its NIC."""
    want = sup.record(vm_id).spec["nics"][0]["mac"]
    for _ in range(50):
        got = (await sh(sup.agent(vm_id), "cat /sys/class/net/eth0/address")).decode().strip()
        if got == want:
            return got
        await asyncio.sleep(0.2)
    raise AssertionError(f"{vm_id}: guest MAC {got}, spec {want}")


async def _check_clones(sup: Supervisor, ports: list[int], template_gen: str) -> None:
    """Each clone serves HTTP, carries the template's running counter, has its own vmgenid,
    MAC and a current clock."""
    gens, macs = {template_gen}, []
    template_mac = await _guest_mac(sup, "t/tmpl")
    for i, p in enumerate(ports):
        assert await http_ok(p), f"clone {i} does not serve HTTP"
        clone_agent = sup.agent(f"c/clone{i}")
        first = await counter(clone_agent)
        assert first > 0  # the template's counter came along in RAM ...
        await asyncio.sleep(0.6)
        assert await counter(clone_agent) > first  # ... and runs on in each clone
        gens.add((await sup.qmp(f"c/clone{i}", "query-vm-generation-id"))["guid"])
        # The guest kernel found the generation id device (ACPI QEMUVGID).
        assert b"QEMUVGID" in await sh(clone_agent, "ls /sys/bus/acpi/devices/")
        # Its wall clock was set to now, not left at the snapshot's time.
        assert abs(int(await sh(clone_agent, "date +%s")) - time.time()) < 3
        # It took its own MAC (the stream brought the template's), and still serves.
        macs.append(await _guest_mac(sup, f"c/clone{i}"))
        assert await http_ok(p)
    assert len(set(macs)) == len(ports) and template_mac not in macs
    assert len(gens) == len(ports) + 1, gens  # every clone has its own generation id


async def _check_refusals(sup: Supervisor, host: HostConfig, store: SnapshotStore) -> None:
    """Another device set, a truncated or a damaged state: a clear error and no VM."""
    before = qemu_processes(str(host.state_dir))
    bigger = spec("big", snapshot="snap1")
    bigger = bigger.model_copy(update={"resources": bigger.resources.model_copy(
        update={"memory_mib": 512})})
    with pytest.raises(SnapshotError, match=r"other hardware.*memory_mib"):
        await sup.start(request(host, "c/big", bigger, None))
    trunc = _copy_snapshot(store, "snap1", "trunc")
    with (trunc / "state").open("r+b") as f:
        f.truncate((trunc / "state").stat().st_size // 2)
    with pytest.raises(SnapshotError, match="truncated"):
        await sup.start(request(host, "c/trunc", spec("trunc", snapshot="trunc"), None))
    bad = _copy_snapshot(store, "snap1", "bad")
    with (bad / "state").open("r+b") as f:
        f.seek(64)
        f.write(b"\xde\xad\xbe\xef" * 64)
    with pytest.raises(SnapshotError, match="damaged"):
        await sup.start(request(host, "c/bad", spec("bad", snapshot="bad"), None))
    # Damage that passes the CRC is QEMU's to find: a clear error, no VM.
    _set_crc(bad)
    with pytest.raises(LaunchError, match="could not load the saved state"):
        await sup.start(request(host, "c/bad2", spec("bad2", snapshot="bad"), None))
    assert "c/bad2" not in sup.ids() or sup.info("c/bad2").state is not VMState.RUNNING
    assert qemu_processes(str(host.state_dir)) == before


def test_snapshot_clones_serve_with_own_vmgenid_and_bad_ones_are_refused(
        host: HostConfig, guest_dir: Path) -> None:
    host = host.model_copy(update={"image_paths": (str(guest_dir),)})
    store = SnapshotStore(host.state_dir)

    async def main() -> None:
        sup = Supervisor(host)
        port = free_port()
        vm = await sup.start(request(host, "t/tmpl", spec("tmpl", port), guest_dir))
        await wait_for_line(vm.stdout, READY, BOOT_TIMEOUT)
        await start_counter(sup.agent("t/tmpl"))
        await asyncio.sleep(1)
        meta = await snapshot_recorded(sup.record("t/tmpl"), host, "snap1")
        assert meta.has_state and meta.disks and meta.vmgenid
        assert meta.machine.startswith("pc-i440fx-") and meta.machine_alias == "pc"
        # The template runs on, on a fresh overlay over the frozen disk.
        assert (await sup.qmp("t/tmpl", "query-status"))["status"] == "running"
        assert await http_ok(port)
        assert (store.root / "snap1" / "disks" / "disk0.qcow2").exists()
        template_gen = (await sup.qmp("t/tmpl", "query-vm-generation-id"))["guid"]

        ports = [free_port() for _ in range(3)]
        await asyncio.sleep(4)  # a clock that resumed at the snapshot's time would be behind
        t0 = time.monotonic()
        await sup.start_many([request(host, f"c/clone{i}", spec(f"clone{i}", p, snapshot="snap1"),
                                      None) for i, p in enumerate(ports)])
        assert time.monotonic() - t0 < 30
        await _check_clones(sup, ports, template_gen)
        assert {m.name: used for m, used in store.listing()} == {"snap1": True}
        with pytest.raises(SnapshotError, match="in use"):
            store.remove("snap1")
        await _check_refusals(sup, host, store)

        await sup.stop_all(timeout=20)
        store.remove("snap1")
        assert store.names() == ["bad", "trunc"]

    asyncio.run(main())
