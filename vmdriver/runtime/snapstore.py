"""The snapshot store: saved VM states and their frozen disks, under the state dir.

::

    <state_dir>/snapshots/<name>/meta.json        what was saved, from which emulator and devices
    <state_dir>/snapshots/<name>/state            the migration stream (RAM + device state)
    <state_dir>/snapshots/<name>/disks/<id>.<fmt> each writable disk as it was, now read-only

A suspended task keeps the same layout in ``<state_dir>/suspend/<key>/``
(:mod:`vmdriver.runtime.snapshots`), its disks used directly on resume.

Before a state is loaded it is checked here: the file is whole (size and
CRC-32 as written), the emulator is not older than the one that saved it,
and the VM's device set is the one saved. QEMU would otherwise fail half-way
through the stream, or worse, load it into different hardware.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from vmdriver.errors import SpecError
from vmdriver.spec import FileMedium, NoNic, VMSpec

#: Names of snapshots: one path component, no leading dot (the store's temp files).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
META_VERSION = 1
STATE_NAME = "state"
META_NAME = "meta.json"
#: The byte QEMU's image locking takes a shared lock on while a node is open for reading.
_QEMU_LOCK_READ_BYTE = 100


class SnapshotError(SpecError):
    """A snapshot is missing, damaged, or does not fit the VM that would load it."""


class DiskBase(BaseModel):
    """One frozen disk of a snapshot."""

    model_config = ConfigDict(frozen=True)

    drive_id: str
    #: File name in ``disks/``.
    file: str
    format: str
    virtual_size: int = 0


class SnapshotMeta(BaseModel):
    """``meta.json`` of a snapshot (or a suspended task)."""

    model_config = ConfigDict(frozen=True)

    version: int = META_VERSION
    name: str
    created_at: float
    #: The VM it was taken of (its id and task name).
    source: str
    #: QEMU's version as ``query-version`` gave it (``7.2.22``).
    qemu_version: str
    #: The versioned machine type (``pc-i440fx-7.2``) and the alias the task used (``pc``).
    machine: str
    machine_alias: str = ""
    #: What a loading VM must match: see :func:`device_signature`.
    signature: dict[str, Any]
    memory_mib: int
    #: The VM had a vmgenid device (clones get a fresh generation id).
    vmgenid: bool = False
    #: Its generation id when saved: a resume keeps it (the same VM), a clone does not.
    generation_id: str | None = None
    #: The MAC of each NIC (by id) when saved: the guest still uses them.
    macs: dict[str, str] = {}
    disks: tuple[DiskBase, ...] = ()
    #: ``None``: no state saved (disks only: a failed save, or a suspend already resumed).
    state_size: int | None = None
    state_crc32: int | None = None
    save_seconds: float = 0.0
    #: How long the guest was paused for the save (ms).
    downtime_ms: int = 0

    @property
    def has_state(self) -> bool:
        """True when a RAM and device state is there to load."""
        return self.state_size is not None


def device_signature(spec: VMSpec) -> dict[str, Any]:
    """The parts of a spec the saved state depends on: the guest's hardware.

    Left out: names, paths, MACs and port forwards (a clone gets its own),
    the machine type (compared after resolving aliases), shutdown and suspend
    settings, and host limits.
    """
    data = spec.model_dump(mode="json")
    drives = [{k: d[k] for k in ("id", "kind", "bus", "index", "read_only", "serial")}
              | {"medium": d["medium"] is not None}
              for d in data["drives"] if not (d["id"] == "seed" and spec.seed is not None)]
    nics = [{"kind": n["kind"]} if isinstance(nic, NoNic) else
            {"kind": n["kind"], "id": n["id"], "model": n["model"]}
            for n, nic in zip(data["nics"], spec.nics, strict=True)]
    res = data["resources"]
    return {
        "emulator": data["emulator"], "accelerator": data["accelerator"],
        "firmware": data["firmware"]["kind"], "cpu": data["cpu"],
        "memory_mib": res["memory_mib"], "max_memory_mib": res["max_memory_mib"],
        "cores": res["cores"], "balloon": data["balloon"], "drives": drives, "nics": nics,
        "tpm": data["tpm"], "rtc": data["rtc"], "display": data["display"]["kind"],
        "channels": data["channels"], "shares": [(s["tag"], s["transport"]) for s in data["shares"]],
        "seed": spec.seed is not None, "guest_agent": data["guest_agent"],
        "vmgenid": spec.vmgenid is not None, "args": data["args"],
    }


def signature_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: saved X, now Y`` for each part that differs."""
    out = []
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            out.append(f"{key}: saved {saved.get(key)!r}, now {now.get(key)!r}")
    return out


def version_tuple(version: str) -> tuple[int, ...]:
    """``7.2.22`` → (7, 2, 22); unreadable parts count as 0."""
    parts = []
    for piece in version.split(".")[:3]:
        digits = re.match(r"\d*", piece)
        parts.append(int(digits.group() or 0) if digits else 0)
    return tuple(parts)


def file_crc32(path: Path) -> int:
    """CRC-32 of a file: cheap enough to run before every load (~1 GB/s)."""
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


#: Files already verified in this process: (path, inode, mtime, size) → True.
_VERIFIED: set[tuple[str, int, int, int]] = set()


class SnapshotDir:
    """One saved state: a named snapshot or a suspended task."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        #: How messages name it (``snapshot "web1"``).
        self.what = what

    @property
    def meta_file(self) -> Path:
        return self.path / META_NAME

    @property
    def state_file(self) -> Path:
        return self.path / STATE_NAME

    @property
    def disks_dir(self) -> Path:
        return self.path / "disks"

    def exists(self) -> bool:
        return self.meta_file.exists()

    def load(self) -> SnapshotMeta:
        """The meta data; :class:`SnapshotError` if it is missing or unreadable."""
        try:
            return SnapshotMeta.model_validate_json(self.meta_file.read_bytes())
        except FileNotFoundError:
            raise SnapshotError(f"{self.what} does not exist", where=str(self.path)) from None
        except (OSError, ValueError, ValidationError) as exc:
            raise SnapshotError(f"{self.what} has unreadable meta data ({str(exc)[:120]})",
                                where=str(self.meta_file)) from None

    def save(self, meta: SnapshotMeta) -> None:
        """Write ``meta.json`` atomically."""
        tmp = self.meta_file.with_name(f".{META_NAME}.tmp")
        tmp.write_text(meta.model_dump_json(indent=1))
        with contextlib.suppress(OSError):
            fd = os.open(tmp, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        tmp.replace(self.meta_file)

    def verify(self, meta: SnapshotMeta) -> None:
        """Refuse a state file that is missing, truncated or changed since it was written."""
        if not meta.has_state:
            raise SnapshotError(f"{self.what} holds no saved state (its save did not finish)",
                                where=str(self.path))
        try:
            st = self.state_file.stat()
        except FileNotFoundError:
            raise SnapshotError(f"{self.what}: the state file is missing",
                                where=str(self.state_file)) from None
        if st.st_size != meta.state_size:
            raise SnapshotError(f"{self.what}: the state file is truncated or damaged "
                                f"({st.st_size} bytes, {meta.state_size} were written)",
                                where=str(self.state_file))
        key = (str(self.state_file), st.st_ino, st.st_mtime_ns, st.st_size)
        if key in _VERIFIED:
            return
        if file_crc32(self.state_file) != meta.state_crc32:
            raise SnapshotError(f"{self.what}: the state file is damaged (its CRC-32 differs "
                                "from the one written)", where=str(self.state_file))
        _VERIFIED.add(key)

    def check_fits(self, meta: SnapshotMeta, spec: VMSpec, qemu_version: str | None) -> None:
        """Refuse to load into another emulator version, machine or device set."""
        if qemu_version is not None and version_tuple(qemu_version) < version_tuple(meta.qemu_version):
            raise SnapshotError(f"{self.what} was saved by QEMU {meta.qemu_version}; this QEMU "
                                f"({qemu_version}) is older and cannot load it", where=str(self.path))
        if spec.machine_type not in (meta.machine, meta.machine_alias):
            raise SnapshotError(f"{self.what} was saved on machine {meta.machine}; the task asks "
                                f"for {spec.machine_type}", where=str(self.path),
                                allowed=", ".join(filter(None, (meta.machine, meta.machine_alias))))
        diff = signature_diff(meta.signature, device_signature(spec))
        if diff:
            raise SnapshotError(f"{self.what} was saved with other hardware than this task has: "
                                + "; ".join(diff[:4]), where=str(self.path))

    def in_use(self) -> bool:
        """True while a QEMU has one of the frozen disks open (its image lock)."""
        for disk in self.disks_dir.glob("*") if self.disks_dir.is_dir() else ():
            try:
                fd = os.open(disk, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _QEMU_LOCK_READ_BYTE)
            except OSError:
                return True
            finally:
                os.close(fd)
        return False


class SnapshotStore:
    """The named snapshots under a state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "snapshots"

    def get(self, name: str) -> SnapshotDir:
        """The snapshot ``name`` (which may not exist yet)."""
        check_snapshot_name(name)
        return SnapshotDir(self.root / name, f"snapshot {name!r}")

    def create(self, name: str) -> SnapshotDir:
        """A new, empty snapshot dir; refuses a name in use."""
        snap = self.get(name)
        # Search-only for others: a jailed QEMU (its own uid) opens the frozen disks as
        # backing files by path; the state file and meta data stay the owner's.
        self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        try:
            snap.path.mkdir(mode=0o711)
        except FileExistsError:
            raise SnapshotError("a snapshot with this name exists", where="vmdriver snapshot",
                                value=name, allowed="a new name, or remove it first") from None
        snap.disks_dir.mkdir(mode=0o711)
        for d in (self.root, snap.path, snap.disks_dir):
            d.chmod(0o711)  # mkdir's mode is cut by the umask
        return snap

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.glob("*") if (p / META_NAME).exists()) \
            if self.root.is_dir() else []

    def load(self, name: str) -> tuple[SnapshotDir, SnapshotMeta]:
        """A snapshot and its meta data; a missing one names those that exist."""
        snap = self.get(name)
        if not snap.exists():
            raise SnapshotError("no such snapshot", where=str(self.root), value=name,
                                allowed=self.names() or "no snapshots yet")
        return snap, snap.load()

    def listing(self) -> list[tuple[SnapshotMeta, bool]]:
        """Every readable snapshot and whether a running VM uses its disks."""
        out = []
        for name in self.names():
            snap = self.get(name)
            with contextlib.suppress(SnapshotError):
                out.append((snap.load(), snap.in_use()))
        return out

    def remove(self, name: str, *, force: bool = False) -> None:
        """Delete a snapshot; refused while a running VM's disks stand on it."""
        snap = self.get(name)
        if not snap.path.is_dir():
            raise SnapshotError("no such snapshot", where=str(self.root), value=name,
                                allowed=self.names() or "no snapshots yet")
        if not force and snap.in_use():
            raise SnapshotError("snapshot is in use: a running VM's disks are overlays on it",
                                where=str(snap.path), value=name,
                                allowed="stop those VMs first")
        shutil.rmtree(snap.path)


def check_snapshot_name(name: str) -> str:
    """``name`` if it is a valid snapshot name."""
    if not re.match(NAME_PATTERN, name):
        raise SnapshotError("not a valid snapshot name", value=name,
                            allowed="1-64 letters, digits, '_', '.', '-', not starting with a dot")
    return name


def image_path(spec_path: str, task_dir: Path) -> Path:
    """Where a file drive's image is on the host (relative paths are in the task dir)."""
    p = Path(spec_path)
    return Path(os.path.realpath(p if p.is_absolute() else task_dir / p))


def file_drives(spec: VMSpec) -> list[tuple[str, FileMedium]]:
    """``(drive id, medium)`` of every writable file drive: the disks a save freezes."""
    return [(d.id, d.medium) for d in spec.drives
            if d.writable and isinstance(d.medium, FileMedium) and d.id != "seed"]


def now() -> float:
    """Wall time, for ``created_at``."""
    return time.time()
