"""Writing below a directory without ever following a symlink: destinations confined at write time.

Checking an archive's links one by one, or a destination once before anything is
written, is not enough: an entry (or an earlier artifact) can plant a link that a
later write then walks through. Every write here starts from a directory fd and
opens each component with ``O_NOFOLLOW``, the way ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS)`` would: a symlink on the way is an error, never a detour,
whatever planted it and whenever.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
from collections.abc import Iterator

from vmdriver.errors import ArtifactError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def components(rel: str, display: str) -> list[str]:
    """The parts of a relative path that must stay below its root (no ``..``, not absolute)."""
    name = rel.replace("\\", "/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or any("\x00" in p for p in parts):
        raise ArtifactError(display, f"{rel!r} would land outside the destination")
    return parts


def _open_dir(parent: int, name: str, *, create: bool, display: str, shown: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ArtifactError(display, f"{shown!r} passes through a symlink or a file; "
                                         "writes never follow links") from None
        raise
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o755, dir_fd=parent)
    return _open_dir(parent, name, create=False, display=display, shown=shown)


@contextlib.contextmanager
def open_dir(root: int, parts: list[str], display: str, *, create: bool = True) -> Iterator[int]:
    """A fd of the directory ``parts`` below ``root``, made as needed, no symlink followed."""
    fd = os.dup(root)
    try:
        for i, part in enumerate(parts):
            nxt = _open_dir(fd, part, create=create, display=display,
                            shown="/".join(parts[:i + 1]))
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def root_fd(path: str) -> Iterator[int]:
    """A directory fd to start confined walks from (the task dir, vmdriver's own)."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


def clear(dir_fd: int, name: str) -> None:
    """Remove whatever ``name`` is in ``dir_fd`` (a file, a link, a tree), following nothing."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        import shutil

        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def create_file(dir_fd: int, name: str, mode: int = 0o644) -> int:
    """A new file ``name`` in ``dir_fd`` opened for writing (an old entry there is replaced)."""
    clear(dir_fd, name)
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                   mode, dir_fd=dir_fd)


def link_inside(name: str, target: str) -> bool:
    """True if a symlink ``name`` → ``target`` points inside the tree, read lexically."""
    if target.startswith("/") or "\x00" in target:
        return False
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    return not (joined == ".." or joined.startswith("../"))


def move_into(src_fd: int, dst_fd: int) -> int:
    """Move every entry of ``src_fd`` into ``dst_fd``: directories merge, the rest replaces.

    Renames are relative to the two fds and never follow the destination's links;
    returns the number of entries moved at the top.
    """
    moved = 0
    for name in sorted(os.listdir(src_fd)):
        st = os.lstat(name, dir_fd=src_fd)
        try:
            dst = os.lstat(name, dir_fd=dst_fd)
        except FileNotFoundError:
            dst = None
        if stat.S_ISDIR(st.st_mode) and dst is not None and stat.S_ISDIR(dst.st_mode):
            inner_src = os.open(name, _DIR_FLAGS, dir_fd=src_fd)
            inner_dst = os.open(name, _DIR_FLAGS, dir_fd=dst_fd)
            try:
                move_into(inner_src, inner_dst)
            finally:
                os.close(inner_src)
                os.close(inner_dst)
        else:
            if dst is not None:
                clear(dst_fd, name)
            os.rename(name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        moved += 1
    return moved
