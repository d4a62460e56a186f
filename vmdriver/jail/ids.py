"""One uid/gid per VM, from a range the operator sets aside, leased through files.

A VM's id is hashed to a starting point in the range, so a VM gets the same
uid every time it is started or re-attached while nothing else holds it; on a
collision the next free id is taken. A lease is a file ``<registry>/<uid>``
holding the VM id, created with ``O_EXCL``: two supervisors can never take the
same id, and no lock is held while a VM runs. Releasing deletes the file.

uid and gid are the same number. The default range, 200000-265535, lies above
what Debian's ``useradd`` hands out for subordinate ids of the first users
(100000-165535); :func:`overlaps` tells the operator when it meets
``/etc/subuid``, ``/etc/subgid`` or an account.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import hashlib
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from vmdriver.errors import HostConfigError, HostError


@dataclass(frozen=True)
class IdRange:
    """``count`` ids starting at ``first``."""

    first: int = 200000
    count: int = 65536

    def __post_init__(self) -> None:
        if self.first < 1000 or self.count < 1 or self.first + self.count > 2**31:
            raise HostConfigError("jail id range must lie within 1000..2^31",
                                  where="jail_ids", value=f"{self.first}+{self.count}")

    @property
    def last(self) -> int:
        return self.first + self.count - 1


DEFAULT_RANGE = IdRange()


@dataclass(frozen=True)
class IdLease:
    """The uid/gid a VM holds while it exists, and the file that proves it."""

    vm_id: str
    uid: int
    path: Path

    @property
    def gid(self) -> int:
        return self.uid


def _start(vm_id: str, ids: IdRange) -> int:
    digest = hashlib.sha256(vm_id.encode("utf-8", "surrogateescape")).digest()
    return ids.first + int.from_bytes(digest[:8], "big") % ids.count


def _is_account(ident: int) -> bool:
    """An id that names a user or group of this host is never leased to a VM."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        with contextlib.suppress(KeyError):
            lookup(ident)
            return True
    return False


def _holder(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return None


def allocate(vm_id: str, registry: Path, ids: IdRange = DEFAULT_RANGE) -> IdLease:
    """The VM's lease: its own if it already holds one, else the first free id from its hash."""
    if not vm_id or "\0" in vm_id:
        raise ValueError("a VM id is needed to lease a jail uid")
    try:
        registry.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise HostError(f"jail id registry {registry}: {exc.strerror}") from exc
    start = _start(vm_id, ids)
    for step in range(ids.count):
        uid = ids.first + (start - ids.first + step) % ids.count
        path = registry / str(uid)
        if _is_account(uid):
            continue
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            if _holder(path) == vm_id:
                return IdLease(vm_id, uid, path)
            continue
        except OSError as exc:
            raise HostError(f"jail id registry {registry}: {exc.strerror}") from exc
        # Another allocator may read it empty for a moment: it then moves on
        # (O_EXCL would refuse it the file anyway).
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(vm_id)
        return IdLease(vm_id, uid, path)
    raise HostError(f"no free jail uid in {ids.first}-{ids.last}: "
                    f"{ids.count} VMs hold one (see {registry})")


def release(lease: IdLease) -> None:
    """Give the id back, if the lease file still names this VM."""
    if _holder(lease.path) == lease.vm_id:
        with contextlib.suppress(FileNotFoundError):
            lease.path.unlink()


def held(registry: Path) -> dict[int, str]:
    """Every leased id and the VM holding it."""
    out: dict[int, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in registry.iterdir():
            holder = _holder(entry)
            if entry.name.isdigit() and holder is not None:
                out[int(entry.name)] = holder
    return out


def _subid_ranges(path: Path) -> list[tuple[int, int]]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return []
        raise
    for line in lines:
        fields = line.split(":")
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            out.append((int(fields[1]), int(fields[2])))
    return out


def overlaps(ids: IdRange = DEFAULT_RANGE, etc: Path = Path("/etc")) -> tuple[str, ...]:
    """Why ``ids`` may be shared with something else on this host (empty: it is not)."""
    found = []
    for name in ("subuid", "subgid"):
        for first, count in _subid_ranges(etc / name):
            if first <= ids.last and ids.first < first + count:
                found.append(f"{etc / name} delegates {first}-{first + count - 1}")
    accounts = sorted({p.pw_uid for p in pwd.getpwall() if ids.first <= p.pw_uid <= ids.last}
                      | {g.gr_gid for g in grp.getgrall() if ids.first <= g.gr_gid <= ids.last})
    if accounts:
        found.append(f"accounts use ids {', '.join(map(str, accounts[:5]))}")
    return tuple(found)
