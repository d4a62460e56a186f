"""Memory snapshots, suspend/resume: save a running VM, start VMs from what was saved.

**Save** (:func:`take_snapshot`, and :func:`~vmdriver.runtime.suspend.suspend`
on stop): the guest is paused, each writable file disk is frozen (the image
file moves into the snapshot's ``disks/``, QEMU keeps it open; a fresh qcow2
overlay takes its old path and is pushed on top with ``blockdev-snapshot``),
the RAM and device state is streamed into a file vmdriver opened, then the
guest continues (or ends). Disk and memory are taken at the same paused
instant, so they agree.

**Start** (:func:`plan_start`, called by the supervisor for every request):
a spec with ``snapshot = NAME`` becomes a VM with ``-incoming defer``, its
disks new overlays on the snapshot's frozen disks, a fresh vmgenid; the state
is loaded through an fd before ``cont``. A spec with ``suspend`` resumes a
saved state of the same task if there is one (then the state file goes: a
state may be loaded once, the disks move on).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from vmdriver.errors import MonitorError, SpecError
from vmdriver.host.config import HostConfig
from vmdriver.host.emulators import emulator_version, find_emulator
from vmdriver.qemu import migration
from vmdriver.qemu.monitor import Monitor
from vmdriver.runtime.prepare import with_own_macs
from vmdriver.runtime.record import VMRecord
from vmdriver.runtime.request import LaunchRequest
from vmdriver.runtime.snapstore import (
    DiskBase,
    SnapshotDir,
    SnapshotError,
    SnapshotMeta,
    SnapshotStore,
    device_signature,
    file_crc32,
    file_drives,
    image_path,
)
from vmdriver.runtime.stateload import state_loader
from vmdriver.runtime.taskdir import TaskDir, VMDirs, vm_key
from vmdriver.spec import FileMedium, MacvtapNic, NoNic, TapNic, VMSpec


def save_timeout(spec: VMSpec) -> float:
    """Seconds a save or load may take: generous for a slow disk (20 MiB/s) plus a minute."""
    res = spec.resources
    return 60.0 + (res.max_memory_mib or res.memory_mib) / 20


# Section: saving


@dataclasses.dataclass
class _Frozen:
    """Disks moved so far, to report (and undo on the drive that failed)."""

    bases: list[DiskBase] = dataclasses.field(default_factory=list)


async def _machine(monitor: Monitor, asked: str) -> tuple[str, str]:
    """The versioned machine type behind ``asked`` and its alias."""
    for m in await monitor.execute("query-machines"):
        if asked in (m.get("name"), m.get("alias")):
            return str(m["name"]), str(m.get("alias") or "")
    return asked, ""


async def generation_id(monitor: Monitor, spec: VMSpec) -> str | None:
    """The VM's current vmgenid (``auto`` resolved), or ``None`` without the device."""
    if spec.vmgenid is None:
        return None
    return str((await monitor.execute("query-vm-generation-id"))["guid"])


async def _qemu_version(monitor: Monitor) -> str:
    q = (await monitor.execute("query-version"))["qemu"]
    return f"{q['major']}.{q['minor']}.{q['micro']}"


def _create_overlay(path: Path, base: Path, fmt: str, size: int) -> None:
    # -u: the base is still open (and locked) by QEMU; size and format are known.
    out = subprocess.run(("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", fmt, "-b",
                          str(base), "--", str(path), str(size)), capture_output=True, text=True,
                         check=False, stdin=subprocess.DEVNULL, timeout=60)
    if out.returncode != 0:
        raise SpecError(f"cannot create an overlay: {out.stderr.strip()[:200]}", where=str(path))


async def _freeze_disks(monitor: Monitor, spec: VMSpec, dirs: VMDirs, snap: SnapshotDir,
                        frozen: _Frozen, *, overlays: bool) -> None:
    """Move each writable disk into ``snap``; with ``overlays``, the VM goes on on new ones."""
    tops = await migration.drive_tops(monitor)
    moves = []
    for drive_id, medium in file_drives(spec):
        src = image_path(medium.path, dirs.task.path)
        top = tops.get(drive_id)
        if top is None:
            raise SpecError("QEMU shows no medium for this drive", where=f"drive {drive_id}")
        dest = snap.disks_dir / f"{drive_id}.{top.format}"
        if src != dest and os.stat(src).st_dev != os.stat(snap.disks_dir).st_dev:
            raise SpecError("the disk is on another file system than the state dir; it cannot "
                            "be frozen in place", where=f"drive {drive_id}", value=str(src))
        moves.append((drive_id, src, dest, top))
    for drive_id, src, dest, top in moves:
        if src != dest:
            os.rename(src, dest)  # QEMU keeps its open file: nothing is copied
            _own_base(dest)
        frozen.bases.append(DiskBase(drive_id=drive_id, file=dest.name, format=top.format,
                                     virtual_size=top.virtual_size))
        if overlays:
            await _push_overlay(monitor, src, dest, top)


def _own_base(path: Path) -> None:
    """A frozen disk is vmdriver's, readable by any VM's uid (a jailed QEMU opens it by path
    as a backing file), written by none."""
    with contextlib.suppress(OSError):
        os.chown(path, os.geteuid(), os.getegid())
    path.chmod(0o444)


async def _push_overlay(monitor: Monitor, path: Path, base: Path,
                        top: migration.BlockTop) -> None:
    await asyncio.to_thread(_create_overlay, path, base, top.format, top.virtual_size)
    ro = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    rw = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        await migration.push_overlay(monitor, top, (ro, rw), migration.new_node_name(top.drive_id))
    finally:
        os.close(ro)
        os.close(rw)


async def _save_state(monitor: Monitor, snap: SnapshotDir, spec: VMSpec) -> float:
    """Stream the state into a temp file next to ``state``; the seconds it took."""
    fd = os.open(_tmp_state(snap), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        return (await migration.migrate_out(monitor, fd, timeout=save_timeout(spec))).seconds
    except BaseException:
        _tmp_state(snap).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _tmp_state(snap: SnapshotDir) -> Path:
    return snap.state_file.with_name(".state.tmp")


def _seal_state(snap: SnapshotDir) -> tuple[int, int]:
    """Make the streamed state durable under its name (after the guest runs on); size, CRC."""
    tmp = _tmp_state(snap)
    fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(snap.state_file)
    return snap.state_file.stat().st_size, file_crc32(snap.state_file)


async def save_vm(monitor: Monitor, spec: VMSpec, dirs: VMDirs, snap: SnapshotDir, *,
                  name: str, source: str, overlays: bool, resume: bool) -> SnapshotMeta:
    """Pause, freeze the disks, save the state into ``snap``; then ``cont`` if ``resume``.

    If the save fails after disks were frozen, the meta data records them
    without a state (the VM's overlays stand on them) and the error is raised.
    """
    await migration.check_migratable(monitor, "save this VM's state", source)
    version = await _qemu_version(monitor)
    machine, alias = await _machine(monitor, spec.machine_type)
    running = (await monitor.execute("query-status"))["status"] == "running"
    t0 = time.monotonic()
    await monitor.execute("stop")
    frozen = _Frozen()
    meta = SnapshotMeta(name=name, created_at=time.time(), source=source, qemu_version=version,
                        machine=machine, machine_alias=alias, signature=device_signature(spec),
                        memory_mib=spec.resources.max_memory_mib or spec.resources.memory_mib,
                        vmgenid=spec.vmgenid is not None,
                        generation_id=await generation_id(monitor, spec),
                        macs={n.id: n.mac for n in spec.nics if not isinstance(n, NoNic) and n.mac})
    try:
        await _freeze_disks(monitor, spec, dirs, snap, frozen, overlays=overlays)
        seconds = await _save_state(monitor, snap, spec)
    except BaseException:
        if frozen.bases:
            snap.save(meta.model_copy(update={"disks": tuple(frozen.bases)}))
        if running and resume:
            with contextlib.suppress(MonitorError):
                await monitor.execute("cont")
        raise
    if running and resume:
        await monitor.execute("cont")
    paused_ms = int((time.monotonic() - t0) * 1000)
    # fsync and CRC while the guest runs again: they need not be in its pause.
    size, crc = await asyncio.to_thread(_seal_state, snap)
    meta = meta.model_copy(update={"disks": tuple(frozen.bases), "state_size": size,
                                   "state_crc32": crc, "save_seconds": round(seconds, 3),
                                   "downtime_ms": paused_ms})
    snap.save(meta)
    return meta


async def take_snapshot(monitor: Monitor, spec: VMSpec, dirs: VMDirs, host: HostConfig,
                        name: str, *, source: str, stop: bool = False) -> SnapshotMeta:
    """``vmdriver snapshot TASK NAME``: save into the store; the VM goes on (or ends)."""
    bad = [d.id for d in spec.drives if d.writable and not isinstance(d.medium, FileMedium)]
    if bad:
        raise SpecError("only file images can be frozen in a snapshot", where=f"drive {bad[0]}")
    snap = SnapshotStore(host.state_dir).create(name)
    try:
        meta = await save_vm(monitor, spec, dirs, snap, name=name, source=source, overlays=True,
                             resume=not stop)
    except BaseException:
        if not snap.exists():
            shutil.rmtree(snap.path, ignore_errors=True)
        raise
    if stop:
        with contextlib.suppress(MonitorError):
            await monitor.execute("quit")
    return meta


# Section: starting from a saved state


def _qemu_version_of(spec: VMSpec) -> str | None:
    binary = find_emulator(spec.emulator)
    st = binary.stat()
    return _cached_version(str(binary), st.st_ino, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _cached_version(binary: str, _inode: int, _mtime: int) -> str | None:
    # Asked once per binary (an upgrade changes inode and mtime): a restore is a hot path.
    return emulator_version(Path(binary))


def _check(snap: SnapshotDir, meta: SnapshotMeta, spec: VMSpec) -> None:
    snap.check_fits(meta, spec, _qemu_version_of(spec))
    snap.verify(meta)


def _agent(req: LaunchRequest) -> Path | None:
    return req.dirs.qga_socket if req.spec.guest_agent else None


def _stderr(req: LaunchRequest) -> Path:
    return req.stderr or req.dirs.task.stderr


def from_snapshot(req: LaunchRequest, host: HostConfig) -> LaunchRequest:
    """A clone of snapshot ``spec.snapshot``: new overlays on its disks, a fresh vmgenid."""
    spec = req.spec
    assert spec.snapshot is not None
    bridged = [n.id for n in spec.nics if isinstance(n, TapNic | MacvtapNic)]
    if bridged and not spec.guest_agent:
        # The NIC's MAC is guest state: without an agent to change it, every clone would
        # carry the template's MAC on the bridge (and fail its own tap's anti-spoofing).
        raise SnapshotError("clones with tap or macvtap NICs need guest_agent = true to take "
                            "their own MAC", where=f"{req.where or spec.name}: NIC {bridged[0]}",
                            allowed="user-mode NICs, or a guest agent")
    snap, meta = SnapshotStore(host.state_dir).load(spec.snapshot)
    # The MACs prepare would derive, fixed now: the loader must know which MAC the guest
    # takes instead of its template's.
    nics = with_own_macs(spec, req.vm_id).nics
    new_macs = {meta.macs[n.id]: n.mac for n in nics
                if not isinstance(n, NoNic) and n.mac and meta.macs.get(n.id, n.mac) != n.mac}
    _check(snap, meta, spec)
    bases = {b.drive_id: b for b in meta.disks}
    drives = []
    for drive in spec.drives:
        base = bases.get(drive.id)
        if base is None:
            drives.append(drive)
            continue
        overlay = req.dirs.task.local / f"{drive.id}.from-{spec.snapshot}.qcow2"
        # A restart starts from the snapshot again: an old overlay holds later writes.
        overlay.unlink(missing_ok=True)
        medium = FileMedium(path=str(overlay), format="qcow2",
                            overlay_on=str(snap.disks_dir / base.file))
        drives.append(drive.model_copy(update={"medium": medium}))
    spec = spec.model_copy(update={
        "drives": tuple(drives), "incoming": True, "machine_type": meta.machine, "nics": nics,
        # A clone must not share its template's generation id (RNG reseed in the guest).
        "vmgenid": str(uuid.uuid4()) if meta.vmgenid else None})
    return dataclasses.replace(req, spec=spec, incoming=state_loader(
        snap, _stderr(req), save_timeout(spec), agent=_agent(req), macs=new_macs))


def suspend_dir(req: LaunchRequest, host: HostConfig) -> SnapshotDir:
    """Where a task's suspended state lives: keyed by job, group and task, not by alloc."""
    env = req.env
    if "NOMAD_JOB_NAME" in env:
        key = vm_key(f"{env['NOMAD_JOB_NAME']}/{env.get('NOMAD_GROUP_NAME', '')}/{req.spec.name}")
    else:
        key = vm_key(req.vm_id)
    return SnapshotDir(host.state_dir / "suspend" / key, f"suspended task {req.spec.name!r}")


def with_suspend(req: LaunchRequest, host: HostConfig) -> LaunchRequest:
    """A task that suspends on stop: resume its saved state, or boot with its kept disks."""
    snap = suspend_dir(req, host)
    spec = req.spec.model_copy(update={"suspend_to": str(snap.path)})
    if not snap.exists():
        return dataclasses.replace(req, spec=spec)
    meta = snap.load()
    if meta.has_state:
        try:
            _check(snap, meta, spec)
        except SnapshotError as exc:
            raise SnapshotError(f"{exc.message}; start the task unchanged to resume it, or "
                                f"delete {snap.state_file} to boot it afresh with its disks",
                                where=exc.where) from None
    by_id = {b.drive_id: b for b in meta.disks}
    drives = tuple(d.model_copy(update={"medium": FileMedium(
        path=str(snap.disks_dir / by_id[d.id].file), format=by_id[d.id].format)})
        if d.id in by_id else d for d in spec.drives)
    spec = spec.model_copy(update={"drives": drives})
    req = dataclasses.replace(req, spec=spec, image_paths=(*req.image_paths, snap.disks_dir))
    if not meta.has_state:
        return req

    def loaded() -> None:
        # Loaded once: from now on the disks move on and the state would be stale.
        snap.state_file.unlink(missing_ok=True)
        snap.save(meta.model_copy(update={"state_size": None, "state_crc32": None}))

    # The same VM again: its generation id and MACs stay (a clone's would change).
    nics = tuple(n if isinstance(n, NoNic) or n.id not in meta.macs else
                 n.model_copy(update={"mac": meta.macs[n.id]}) for n in spec.nics)
    spec = spec.model_copy(update={"incoming": True, "machine_type": meta.machine, "nics": nics,
                                   "vmgenid": meta.generation_id or spec.vmgenid})
    return dataclasses.replace(req, spec=spec, incoming=state_loader(
        snap, _stderr(req), save_timeout(spec), loaded, agent=_agent(req)))


def plan_start(req: LaunchRequest, host: HostConfig) -> LaunchRequest:
    """The request as it must launch: from a snapshot, resumed, or unchanged."""
    if req.spec.snapshot and req.spec.suspend:
        raise SpecError("a task cannot both start from a snapshot and suspend", where=req.where,
                        allowed="snapshot or suspend")
    if req.incoming is not None:
        return req  # a live migration brings its own state
    if req.spec.snapshot:
        return from_snapshot(req, host)
    if req.spec.suspend:
        return with_suspend(req, host)
    return req


# Section: snapshots of VMs other supervisors run


async def snapshot_recorded(record: VMRecord, host: HostConfig, name: str, *,
                            stop: bool = False) -> SnapshotMeta:
    """Snapshot a VM another supervisor runs, through its QMP socket (`vmdriver snapshot`)."""
    spec = VMSpec.model_validate(record.spec)
    dirs = VMDirs(TaskDir(Path(record.alloc_dir), record.task), Path(record.runtime_dir),
                  Path(record.data_dir))
    monitor = Monitor(f"{record.task} (snapshot)")
    await monitor.connect(Path(record.qmp_socket))
    try:
        return await take_snapshot(monitor, spec, dirs, host, name, source=record.id, stop=stop)
    finally:
        await monitor.disconnect()
