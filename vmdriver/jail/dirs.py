"""Host files a jailed VM's uid must reach, handed over before launch and back after.

:func:`prepare_dirs` (as root, before spawning):

* chowns each read-write dir of the spec, and everything in it, to the VM's
  uid/gid. The walk never follows a symlink, never leaves the dir's filesystem
  and skips files with more than one hard link: a job that planted a hard link
  to a host file in its task dir must not get that file chowned to it.
* grants the VM's uid search (``x``) permission, as a POSIX ACL entry, on every
  parent dir of a bind source it could not pass otherwise: bwrap resolves bind
  sources as the VM's uid. Only bwrap's own setup uses it; inside the jail no
  host path exists.
* grants read-write on each device of the spec the uid cannot open
  (``/dev/kvm`` is often 0600 root).

:func:`release` undoes all three; the files the VM made become the
supervisor's, so a later VM that gets the same uid cannot reach them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import PurePosixPath

from vmdriver.errors import HostError
from vmdriver.jail.plan import BASE_DEVICES, JailSpec

_XATTR = "system.posix_acl_access"
_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_UNDEF = 0xFFFFFFFF
_ENTRY = struct.Struct("<HHI")
_SEARCH, _READ_WRITE = 1, 6


def _read_acl(path: str, mode: int) -> list[tuple[int, int, int]]:
    try:
        raw = os.getxattr(path, _XATTR, follow_symlinks=False)
    except OSError:
        raw = b""
    if len(raw) >= 4 and (len(raw) - 4) % _ENTRY.size == 0:
        return [_ENTRY.unpack_from(raw, 4 + i * _ENTRY.size)
                for i in range((len(raw) - 4) // _ENTRY.size)]
    return [(_USER_OBJ, (mode >> 6) & 7, _UNDEF), (_GROUP_OBJ, (mode >> 3) & 7, _UNDEF),
            (_OTHER, mode & 7, _UNDEF)]


def _write_acl(path: str, entries: list[tuple[int, int, int]]) -> None:
    """Store ``entries`` with a recomputed mask, or drop the ACL when it is minimal again."""
    body = [e for e in entries if e[0] != _MASK]
    if not any(tag in (_USER, _GROUP) for tag, _, _ in body):
        group = next(perm for tag, perm, _ in body if tag == _GROUP_OBJ)
        with contextlib.suppress(OSError):
            os.removexattr(path, _XATTR, follow_symlinks=False)
        # Without an ACL the mode's group bits are the owning group's again.
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        os.chmod(path, (mode & ~0o070) | (group << 3))
        return
    mask = 0
    for tag, perm, _ in body:
        if tag in (_USER, _GROUP, _GROUP_OBJ):
            mask |= perm
    body.append((_MASK, mask, _UNDEF))
    body.sort(key=lambda e: (e[0], e[2]))
    raw = struct.pack("<I", _VERSION) + b"".join(_ENTRY.pack(*e) for e in body)
    os.setxattr(path, _XATTR, raw, follow_symlinks=False)


#: ACL updates are read-modify-write of one xattr: VMs starting at once (threads of
#: one supervisor, or several supervisors) must not lose each other's entries.
_ACL_LOCK = threading.Lock()


def _lock_fd(path: str) -> int:
    """An fd of ``path`` to flock, or -1: for a link, an unopenable node, or a device
    (opening a macvtap's /dev/tapN has effects), the thread lock is what there is."""
    try:
        if not (stat.S_ISREG(mode := os.lstat(path).st_mode) or stat.S_ISDIR(mode)):
            return -1
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return -1


@contextlib.contextmanager
def _exclusive(path: str) -> Iterator[None]:
    """This process's lock, and an flock on ``path`` itself against other processes."""
    with _ACL_LOCK:
        fd = _lock_fd(path)
        if fd < 0:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def grant(path: str, uid: int, perm: int) -> None:
    """Add (or widen) ``uid``'s ACL entry on ``path``."""
    with _exclusive(path):
        st = os.lstat(path)
        entries = _read_acl(path, st.st_mode)
        old = next((p for t, p, i in entries if t == _USER and i == uid), 0)
        entries = [e for e in entries if not (e[0] == _USER and e[2] == uid)]
        entries.append((_USER, old | perm, uid))
        _write_acl(path, entries)


def revoke(path: str, uid: int) -> None:
    """Remove ``uid``'s ACL entry from ``path``, if it has one."""
    with _exclusive(path):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        entries = _read_acl(path, st.st_mode)
        kept = [e for e in entries if not (e[0] == _USER and e[2] == uid)]
        if len(kept) != len(entries):
            _write_acl(path, kept)


def _can(path: str, uid: int, gids: Iterable[int], want: int) -> bool:
    """Would ``uid`` (with ``gids``) have ``want`` on ``path`` by mode and ACL?"""
    st = os.stat(path)
    entries = _read_acl(path, st.st_mode)
    mask = next((p for t, p, _ in entries if t == _MASK), 7)
    if st.st_uid == uid:
        return (st.st_mode >> 6) & want == want
    named = next((p for t, p, i in entries if t == _USER and i == uid), None)
    if named is not None:
        return named & mask & want == want
    if st.st_gid in gids:
        return (st.st_mode >> 3) & want == want
    return st.st_mode & want == want


def _parents(paths: Iterable[str]) -> list[str]:
    out: dict[str, None] = {}
    for p in paths:
        for parent in reversed(PurePosixPath(p).parents):
            out[str(parent)] = None
    return list(out)


def _chown_tree(top: str, uid: int, gid: int) -> None:
    """chown ``top`` and what is in it, on its own filesystem, never through a link."""
    top_dev = os.lstat(top).st_dev
    os.chown(top, uid, gid, follow_symlinks=False)
    for _root, dirs, files, dirfd in os.fwalk(top, follow_symlinks=False):
        for name in (*dirs, *files):
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if st.st_dev != top_dev or (not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1):
                continue
            os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
        # Never descend into another filesystem mounted inside.
        dirs[:] = [d for d in dirs
                   if os.stat(d, dir_fd=dirfd, follow_symlinks=False).st_dev == top_dev]


def _inside(path: str, roots: Iterable[str]) -> str | None:
    for root in roots:
        if path == root or path.startswith(root.rstrip("/") + "/"):
            return root
    return None


def check_control_plane(spec: JailSpec, control: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse a jail whose writable dirs hold (or are inside) what the supervisor trusts.

    ``control``: the VM record, the supervisor's own sockets and logs. A writable
    dir would let the VM's uid rewrite, replace or symlink them away (a rewritten
    record would steer what a re-attaching supervisor signals and removes).
    """
    for item in control:
        path = os.path.normpath(os.fspath(item))
        root = _inside(path, spec.rw_paths)
        if root is not None:
            raise HostError(f"jail: {path} is the supervisor's, but lies in the VM's "
                            f"writable {root}")


def prepare_dirs(spec: JailSpec, control: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Hand the spec's read-write dirs, the way to its binds and its devices to the VM's uid.

    ``control`` is checked first (:func:`check_control_plane`).
    """
    check_control_plane(spec, control)
    if spec.uid is None or spec.gid is None:
        return
    gids = (spec.gid, *spec.groups)
    try:
        for path in spec.rw_paths:
            _chown_tree(path, spec.uid, spec.gid)
        for parent in _parents((*spec.rw_paths, *spec.ro_paths)):
            if not _can(parent, spec.uid, gids, _SEARCH):
                grant(parent, spec.uid, _SEARCH)
        for dev in dict.fromkeys((*BASE_DEVICES, *spec.devices)):
            if not _can(dev, spec.uid, gids, _READ_WRITE):
                grant(dev, spec.uid, _READ_WRITE)
    except OSError as exc:
        raise HostError(f"jail: cannot hand {exc.filename} to uid {spec.uid}: "
                        f"{exc.strerror}") from exc


def release(spec: JailSpec, owner: tuple[int, int] | None = None) -> None:
    """Undo :func:`prepare_dirs`: files back to ``owner`` (default: this process), grants gone."""
    if spec.uid is None:
        return
    uid, gid = owner if owner is not None else (os.getuid(), os.getgid())
    for path in spec.rw_paths:
        with contextlib.suppress(FileNotFoundError):
            _chown_tree(path, uid, gid)
    for path in (*_parents((*spec.rw_paths, *spec.ro_paths)), *spec.devices, *BASE_DEVICES):
        with contextlib.suppress(OSError):
            revoke(path, spec.uid)
