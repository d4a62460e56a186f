"""Live migration between two supervisors, over a unix socket or TCP.

One connection carries everything, in this order::

    source → destination   one JSON line: the VM (spec, emulator, machine, disk paths)
    destination → source   {"status": "ready"} once its QEMU waits with -incoming defer
    source → destination   QEMU's migration stream (source QEMU writes, destination QEMU reads)
    destination → source   {"status": "running", ...} once the guest runs there, or
                           {"status": "failed", "error": ...}

Both QEMUs get the connected socket itself (``getfd``), so neither opens a
socket or a path. The source keeps its VM, paused after the stream, until the
destination says it runs: then it ends its QEMU; on a failure it continues.
Disks must be reachable from both sides at the same paths (same host, or
shared storage listed in ``image_paths``); disks inside the source's task dir
move to ``<state_dir>/migrated/<key>/`` first, since the source's task dir goes
when its VM ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmdriver.errors import InputError, LaunchError, MonitorError, SpecError
from vmdriver.host.config import HostConfig
from vmdriver.qemu import migration
from vmdriver.qemu.monitor import Monitor
from vmdriver.runtime.record import VMRecord
from vmdriver.runtime.request import LaunchRequest
from vmdriver.runtime.snapshots import generation_id, save_timeout
from vmdriver.runtime.snapstore import file_drives, image_path
from vmdriver.runtime.stateload import log_tail
from vmdriver.runtime.taskdir import TaskDir, VMDirs, vm_key
from vmdriver.spec import FileMedium, UserNic, VMSpec

PROTOCOL = 1
#: How long the source waits for the destination's answers.
ANSWER_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class MigrationReport:
    """What a finished live migration took."""

    total_s: float
    #: The guest's pause: QEMU's own downtime plus the wait for the destination's `cont`.
    downtime_ms: int
    ram_mib: float
    destination: dict[str, Any]


def parse_address(addr: str) -> tuple[int, Any]:
    """``unix:/path``, ``/path``, or ``host:port`` → (family, address)."""
    if addr.startswith("unix:"):
        return socket.AF_UNIX, addr[5:]
    if addr.startswith("/"):
        return socket.AF_UNIX, addr
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise InputError("not a migration address", value=addr,
                         allowed="unix:/path/to.sock, /path/to.sock, or host:port")
    return socket.AF_INET6 if ":" in host else socket.AF_INET, (host.strip("[]"), int(port))


def send_message(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.sendall(json.dumps(msg).encode() + b"\n")


def receive_message(sock: socket.socket, timeout: float) -> dict[str, Any]:
    """One JSON line, read byte by byte: nothing after it may be taken from the stream."""
    sock.settimeout(timeout)
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                raise MonitorError("the other side closed the migration connection")
            data += chunk
            if len(data) > 1 << 20:
                raise MonitorError("the migration header is too long")
    except TimeoutError:
        raise MonitorError(f"no answer on the migration connection within {timeout:g}s") from None
    finally:
        sock.settimeout(None)
    msg = json.loads(data)
    if not isinstance(msg, dict):
        raise MonitorError("the migration peer sent something that is not a message")
    return msg


# Section: source


def _move_task_disks(spec: VMSpec, task: TaskDir, dest: Path) -> list[tuple[Path, Path]]:
    """Disks inside the task dir move out (the source's task dir goes with its VM)."""
    moves = []
    for drive_id, medium in file_drives(spec):
        src = image_path(medium.path, task.path)
        if task.path.resolve() in src.parents:
            dest.mkdir(parents=True, exist_ok=True, mode=0o700)
            target = dest / f"{drive_id}{src.suffix}"
            os.rename(src, target)
            moves.append((src, target))
    return moves


def _header(record: VMRecord, moves: list[tuple[Path, Path]], version: str,
            generation: str | None) -> dict[str, Any]:
    spec = VMSpec.model_validate(record.spec)
    moved = {str(a): str(b) for a, b in moves}
    drives = []
    for drive in spec.drives:
        if drive.id == "seed" and spec.seed is not None:
            continue  # the destination builds its own seed from the spec
        if isinstance(drive.medium, FileMedium):
            path = str(image_path(drive.medium.path, Path(record.alloc_dir) / record.task))
            drive = drive.model_copy(update={"medium": drive.medium.model_copy(update={  # noqa: PLW2901
                "path": moved.get(path, path), "overlay_on": None})})
        drives.append(drive)
    # The same VM moves: it keeps its generation id (``auto`` would make a new one).
    spec = spec.model_copy(update={"drives": tuple(drives), "snapshot": None, "suspend": False,
                                   "suspend_to": None, "incoming": False,
                                   "vmgenid": generation or spec.vmgenid})
    return {"protocol": PROTOCOL, "id": record.id, "task": record.task, "qemu_version": version,
            "spec": spec.model_dump(mode="json")}


async def migrate_recorded(record: VMRecord, host: HostConfig, address: str) -> MigrationReport:
    """Move the VM of ``record`` (run by any supervisor on this host) to ``address``."""
    family, addr = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    monitor = Monitor(f"{record.task} (migration)")
    moves: list[tuple[Path, Path]] = []
    try:
        await asyncio.to_thread(sock.connect, addr)
        await monitor.connect(Path(record.qmp_socket))
        await migration.check_migratable(monitor, "migrate this VM", record.id)
        q = (await monitor.execute("query-version"))["qemu"]
        spec = VMSpec.model_validate(record.spec)
        moves = _move_task_disks(spec, TaskDir(Path(record.alloc_dir), record.task),
                                 host.state_dir / "migrated" / vm_key(record.id))
        header = _header(record, moves, f"{q['major']}.{q['minor']}.{q['micro']}",
                         await generation_id(monitor, spec))
        t0 = time.monotonic()
        await asyncio.to_thread(send_message, sock, header)
        await _expect(sock, "ready")
        stats = await migration.migrate_out(monitor, sock.fileno(), live=True,
                                            timeout=save_timeout(spec) * 4)
        done = time.monotonic()
        answer = await _expect(sock, "running")
        waited = time.monotonic() - done
        with contextlib.suppress(MonitorError):
            await monitor.execute("quit")
        moves = []  # the destination owns the disks now
        return MigrationReport(time.monotonic() - t0,
                               int((stats.downtime_ms or 0) + waited * 1000),
                               stats.ram_bytes / (1 << 20), answer)
    except BaseException:
        # Whatever failed, the VM goes on here, on its own disks.
        with contextlib.suppress(MonitorError):
            if monitor.connected and (await monitor.execute("query-status"))["status"] != "running":
                await monitor.execute("cont")
        for src, target in moves:
            with contextlib.suppress(OSError):
                os.rename(target, src)
        raise
    finally:
        sock.close()
        await monitor.disconnect()


async def _expect(sock: socket.socket, status: str) -> dict[str, Any]:
    msg = await asyncio.to_thread(receive_message, sock, ANSWER_TIMEOUT_S)
    if msg.get("status") != status:
        raise MonitorError(f"the destination refused the migration: "
                           f"{msg.get('error') or msg.get('status')}")
    return msg


# Section: destination


def listen(address: str) -> socket.socket:
    """A listening socket for ``vmdriver receive --listen ADDR``."""
    family, addr = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_UNIX:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(addr)
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    if family == socket.AF_UNIX:
        os.chmod(addr, 0o600)
    sock.listen(1)
    return sock


def accept_one(listener: socket.socket) -> socket.socket:
    """The first connection; the listener (and its socket file) goes: one VM per receive."""
    conn, _ = listener.accept()
    path = listener.getsockname() if listener.family == socket.AF_UNIX else None
    listener.close()
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return conn


def _free_port(port: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("", port))
            return port
        except OSError:
            s.bind(("", 0))
            return int(s.getsockname()[1])


def _allowed_disk(path: str, host: HostConfig) -> Path:
    real = Path(os.path.realpath(path))
    roots = [Path(os.path.realpath(p)) for p in host.image_paths]
    roots.append(Path(os.path.realpath(host.state_dir / "migrated")))
    if not any(real == r or r in real.parents for r in roots):
        raise SpecError("a migrated disk must be in the state dir's migrated/ or an image path",
                        where="migration", value=path, allowed=", ".join(map(str, roots)))
    return real


def incoming_request(header: dict[str, Any], conn: socket.socket, host: HostConfig,
                     alloc: str) -> LaunchRequest:
    """The destination's launch request for a migration header; refuses what policy forbids."""
    if header.get("protocol") != PROTOCOL:
        raise SpecError("unknown migration protocol", value=header.get("protocol"),
                        allowed=str(PROTOCOL))
    spec = VMSpec.model_validate(header["spec"])
    if spec.firmware.vars:
        # The destination would copy a vars template there: only where its disks may be.
        _allowed_disk(spec.firmware.vars, host)
    image_dirs = []
    drives = []
    for d in spec.drives:
        if isinstance(d.medium, FileMedium):
            real = _allowed_disk(d.medium.path, host)
            image_dirs.append(real.parent)
        drives.append(d)
    nics = tuple(n.model_copy(update={"forwards": tuple(
        f.model_copy(update={"host_port": _free_port(f.host_port)}) for f in n.forwards)})
        if isinstance(n, UserNic) else n for n in spec.nics)
    spec = spec.model_copy(update={"drives": tuple(drives), "nics": nics, "incoming": True})
    task = TaskDir(host.state_dir / "allocs" / alloc, str(header["task"]))
    vm_id = f"{alloc}/{header['task']}"
    dirs = VMDirs.under(host.state_dir, vm_id, task)

    async def load(monitor: Monitor) -> None:
        await migration.start_incoming(monitor, conn.fileno())
        await asyncio.to_thread(send_message, conn, {"status": "ready"})
        try:
            await migration.wait_incoming(monitor, timeout=save_timeout(spec) * 4)
        except MonitorError as exc:
            await asyncio.sleep(0.3)
            raise LaunchError(f"migration of {vm_id}: QEMU could not load the state ({exc})",
                              stderr_tail=log_tail(task.stderr)) from exc

    return LaunchRequest(vm_id=vm_id, spec=spec, dirs=dirs, incoming=load,
                         image_paths=tuple(image_dirs), remove_task_dir=True,
                         where=f"migration of {header.get('id')}")


def forwards_of(spec: VMSpec) -> list[str]:
    """``label host:P → guest:Q`` of each user-mode forward, for reports."""
    return [f"{f.label} host:{f.host_port} → guest:{f.guest_port}"
            for n in spec.nics if isinstance(n, UserNic) for f in n.forwards]
