"""File operations the pools need, done through directory fds so no name can lead elsewhere.

A pool opens its directory once; every later open, rename and unlink names a
single component relative to that fd with ``O_NOFOLLOW``, so a ``..`` or a
symlink planted in the pool cannot redirect a write. Copies try a reflink
(``FICLONE``) first and otherwise copy only the data extents
(``SEEK_DATA``/``SEEK_HOLE`` + ``copy_file_range``): what ``cp --reflink=auto
--sparse=auto`` does, without a process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
from collections.abc import Iterator

from vmdriver.storage.errors import StorageError, StorageFull

#: linux/fs.h: _IOW(0x94, 9, int)
FICLONE = 0x40049409
#: Errors meaning "this filesystem cannot reflink these two files".
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS,
               errno.EPERM}
_CHUNK = 1 << 30
_READ = 1 << 20
_FULL = {errno.ENOSPC, errno.EDQUOT}
_HASH_BLOCK = 1 << 20


def open_dir(name: str, *, dir_fd: int | None, create: bool = False) -> int:
    """Open a directory (creating it 0700), refusing a symlink in its place."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=dir_fd)
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=dir_fd)
    except OSError as exc:
        what = "a symbolic link" if _is_link(name, dir_fd) else exc.strerror
        raise StorageError(f"pool directory {name!r} cannot be used: {what}") from None


def _is_link(name: str, dir_fd: int | None) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def open_file(name: str, dir_fd: int, *, write: bool = False, where: str = "") -> int:
    """Open an existing regular file in ``dir_fd``, never through a symlink."""
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise StorageError(f"volume {name!r} does not exist", where=where) from None
    except OSError as exc:
        what = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise StorageError(f"volume {name!r} cannot be opened: {what}", where=where) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StorageError(f"volume {name!r} is not a regular file", where=where)
    os.set_blocking(fd, True)
    return fd


def exists(name: str, dir_fd: int) -> bool:
    """True if ``name`` exists in ``dir_fd`` (a symlink counts: the name is taken)."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def publish(tmp: str, tmp_dir: int, name: str, dir_fd: int, *, where: str) -> None:
    """Give the finished ``tmp`` its final ``name``; fails if the name is taken, never replaces."""
    try:
        os.link(tmp, name, src_dir_fd=tmp_dir, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        raise StorageError(f"volume {name!r} already exists", where=where) from None
    os.unlink(tmp, dir_fd=tmp_dir)


def unlink(name: str, dir_fd: int) -> bool:
    """Remove a file if present; True if it was there."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def fsync_dir(dir_fd: int) -> None:
    """Make renames and unlinks in ``dir_fd`` durable."""
    os.fsync(dir_fd)


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of every data region; holes are skipped."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no SEEK_DATA: all data
                yield pos, size - pos
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        pos = end


def clone(src_fd: int, dst_fd: int, *, where: str) -> str:
    """Make ``dst_fd`` (empty) a copy of ``src_fd``: a reflink where possible, else a sparse copy.

    Returns ``"reflink"`` or ``"copy"``.
    """
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return "reflink"
    except OSError as exc:
        if exc.errno not in _NO_REFLINK:
            raise copy_error(exc, where) from None
    size = os.fstat(src_fd).st_size
    try:
        for offset, length in data_extents(src_fd, size):
            _copy_range(src_fd, dst_fd, offset, length)
        os.ftruncate(dst_fd, size)
    except OSError as exc:
        raise copy_error(exc, where) from None
    return "copy"


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        try:
            done = os.copy_file_range(src, dst, min(_CHUNK, end - offset), offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            done = _copy_plain(src, dst, offset, end)
        if done == 0:
            raise StorageError("source volume shrank while it was being copied")
        offset += done


def _copy_plain(src: int, dst: int, offset: int, end: int) -> int:
    """Userspace copy, for filesystems without copy_file_range between these two files."""
    data = os.pread(src, min(_READ * 8, end - offset), offset)
    if data:
        os.pwrite(dst, data, offset)
    return len(data)


def copy_error(exc: OSError, where: str) -> StorageError:
    if exc.errno in _FULL:
        return StorageFull("no space left in the pool to copy the volume", where=where)
    return StorageError(f"cannot copy the volume: {exc.strerror}", where=where)


def content_sha256(fd: int) -> str:
    """SHA-256 of the file's content, skipping holes and all-zero blocks.

    The file is cut into 1 MiB blocks; the hash covers the size and the index and
    bytes of every block that is not all zeros. That depends on the bytes only
    (not on where the filesystem keeps holes), so two copies of one image share a
    base; and it is injective, so two different images never do. Holes are not
    read, so a sparse 10 GiB image with 1 GiB of data costs 1 GiB of hashing.
    """
    size = os.fstat(fd).st_size
    h = hashlib.sha256(b"vmdriver-content-sha256\0" + size.to_bytes(8, "little"))
    zero = bytes(_HASH_BLOCK)
    done = -1
    for offset, length in data_extents(fd, size):
        for idx in range(max(offset // _HASH_BLOCK, done + 1),
                         (offset + length + _HASH_BLOCK - 1) // _HASH_BLOCK):
            block = os.pread(fd, _HASH_BLOCK, idx * _HASH_BLOCK)
            if block != zero[: len(block)]:
                h.update(idx.to_bytes(8, "little"))
                h.update(block)
            done = idx
    return h.hexdigest()
