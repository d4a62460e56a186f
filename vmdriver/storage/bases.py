"""Shared bases for chained disks: one per image content, reference-counted, made once.

A chained disk from ``source.image`` is a qcow2 overlay on a *base*: a copy of
the image inside the pool, named after a hash of its content, so every task
chaining to the same image shares it. Layout under the pool's ``.vmdriver``::

    bases/<fmt>-<sha256>.<fmt>     the bases (made read-only, 0400)
    refs/<base>/<volume>           one empty file per volume chained on it
    locks/<base>.lock              flock: one creator, no half-made base seen
    memo/<kind>-<dev>-<ino>        content hash / qemu-img facts of a file, by stat identity

Hashing a 10 GiB image on every start would cost seconds; :class:`StatMemo`
remembers each file's hash keyed by (device, inode, size, mtime, ctime), so a
later start costs one ``fstat`` and a tiny read. ``ctime`` cannot be set from
user space, so a file rewritten in place (even with its mtime put back) is
hashed again. The same memo keeps what ``qemu-img info`` said of a source
volume, so cloning a golden volume does not start a process to inspect it again.

Every change to a base or its refs happens under its lock, and a volume is
published (renamed into place) before the lock is released, so a collector
holding the lock sees refs and volumes agree.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator

from vmdriver.storage import fsutil
from vmdriver.storage.base import SourceImage
from vmdriver.storage.errors import StorageError

_BASE_RE = re.compile(r"^(qcow2|raw)-[0-9a-f]{64}\.(qcow2|raw)$", re.ASCII)


class StatMemo:
    """Facts about files (a content hash, what qemu-img says), remembered by stat identity.

    An entry is keyed by device and inode and valid while size, mtime and ctime
    are unchanged; ``ctime`` cannot be set from user space, so a file rewritten in
    place (even with its mtime put back) is looked at again.
    """

    def __init__(self, dir_fd: int) -> None:
        self.dir_fd = dir_fd

    def remember(self, fd: int, kind: str,
                 compute: Callable[[], dict[str, object]]) -> dict[str, object]:
        """``compute()`` for the open file ``fd``, or what it gave last time for this file."""
        st = os.fstat(fd)
        ident: dict[str, object] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                    "ctime_ns": st.st_ctime_ns}
        entry = f"{kind}-{st.st_dev}-{st.st_ino}"
        cached = self._read(entry)
        if cached is not None and {k: cached.get(k) for k in ident} == ident:
            value = cached.get("value")
            if isinstance(value, dict):
                return value
        value = compute()
        after = os.fstat(fd)
        if (after.st_mtime_ns, after.st_ctime_ns) == (st.st_mtime_ns, st.st_ctime_ns):
            self._write(entry, {**ident, "value": value})
        # else: changed while computing: use the answer once, remember nothing
        return value

    def sha256(self, fd: int) -> str:
        """The content hash (:func:`fsutil.content_sha256`) of the open file ``fd``."""
        return str(self.remember(fd, "sha256",
                                 lambda: {"sha256": fsutil.content_sha256(fd)})["sha256"])

    def _read(self, entry: str) -> dict[str, object] | None:
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except OSError:
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                data = json.loads(f.read(65536))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _write(self, entry: str, data: dict[str, object]) -> None:
        tmp = f".{entry}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self.dir_fd)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, entry, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except BaseException:
            fsutil.unlink(tmp, self.dir_fd)
            raise


def base_format(image: SourceImage) -> str:
    """raw and qcow2 images are copied as they are; others, and chains, become one qcow2."""
    return image.format if image.format in ("qcow2", "raw") and not image.chain else "qcow2"


def base_name(image: SourceImage, digest: str) -> str:
    """The base's file name: its format and content key."""
    fmt = base_format(image)
    return f"{fmt}-{digest}.{fmt}"


def content_key(image: SourceImage, memo: StatMemo) -> str:
    """A key for the image's content: its hash, or for a chain, a hash of each file's."""
    if not image.chain:
        return memo.sha256(image.fd)
    parts = [f"{fmt}:{memo.sha256(fd)}" for fd, fmt in [(image.fd, image.format), *image.chain]]
    return hashlib.sha256(("chain\0" + "\0".join(parts)).encode()).hexdigest()


def is_base_name(name: str) -> bool:
    """True for names :func:`base_name` makes."""
    return bool(_BASE_RE.match(name))


class BaseRefs:
    """The locks and reference files of the bases in one pool."""

    def __init__(self, bases_fd: int, refs_fd: int, locks_fd: int) -> None:
        self.bases_fd = bases_fd
        self.refs_fd = refs_fd
        self.locks_fd = locks_fd

    @contextlib.contextmanager
    def locked(self, base: str) -> Iterator[None]:
        """Hold ``base``'s lock (blocking): across processes, one holder at a time."""
        fd = os.open(f"{base}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self.locks_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def add(self, base: str, volume: str) -> None:
        """Record that ``volume`` is chained on ``base`` (hold the lock)."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(base, 0o700, dir_fd=self.refs_fd)
        d = fsutil.open_dir(base, dir_fd=self.refs_fd)
        try:
            os.close(os.open(volume, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=d))
        finally:
            os.close(d)

    def users(self, base: str) -> list[str]:
        """The volumes recorded as chained on ``base``."""
        try:
            d = fsutil.open_dir(base, dir_fd=self.refs_fd)
        except StorageError:
            return []
        try:
            return sorted(os.listdir(d))
        finally:
            os.close(d)

    def drop(self, base: str, volume: str) -> bool:
        """Forget one user; remove the base when none is left (hold the lock). True if removed."""
        with contextlib.suppress(StorageError):
            d = fsutil.open_dir(base, dir_fd=self.refs_fd)
            try:
                fsutil.unlink(volume, d)
            finally:
                os.close(d)
        if self.users(base):
            return False
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rmdir(base, dir_fd=self.refs_fd)
        # The lock file stays: unlinking it would let a waiter and a newcomer
        # each hold a lock on a different inode.
        return fsutil.unlink(base, self.bases_fd)

    def base_of(self, volume: str) -> str | None:
        """The base ``volume`` is chained on, if any (one stat per base)."""
        for base in self.all_bases():
            with contextlib.suppress(StorageError):
                d = fsutil.open_dir(base, dir_fd=self.refs_fd)
                try:
                    if fsutil.exists(volume, d):
                        return base
                finally:
                    os.close(d)
        return None

    def all_bases(self) -> list[str]:
        """Every base known by a file or by refs."""
        names = set(os.listdir(self.bases_fd)) | set(os.listdir(self.refs_fd))
        return sorted(n for n in names if is_base_name(n))
