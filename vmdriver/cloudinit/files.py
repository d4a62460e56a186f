"""Read a job's user-data or network-config file from its task dir, and nowhere else.

nomad-driver-virt opens whatever host path ``user_data`` names, with the
plugin's rights. Here the path is relative to the task dir, and after
resolving symlinks it must still be inside it: a job cannot make the driver
read another task's secrets or the host's files into a VM.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vmdriver.errors import SpecError

#: cloud-init keeps user-data in memory and on disk several times; 1 MiB is plenty.
MAX_BYTES = 1024 * 1024


def read_task_file(task_dir: Path, path: str, *, where: str = "user_data", limit: int = MAX_BYTES) -> str:
    """The UTF-8 text of ``path`` (relative to ``task_dir``; symlinks must stay inside it).

    :raise SpecError: the path leaves the task dir, is not a regular file, is too
        big, or is not UTF-8 text.
    """
    if not path or "\0" in path or os.path.isabs(path):
        raise SpecError("must be a path relative to the task dir", where=where, value=path)
    root = task_dir.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise SpecError("the path leaves the task dir", where=where, value=path)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise SpecError(f"cannot open it: {exc.strerror}", where=where, value=path) from None
    try:
        # A directory on the way may have been swapped for a symlink since resolve().
        if not Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(root):
            raise SpecError("the path leaves the task dir", where=where, value=path)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SpecError("not a regular file", where=where, value=path)
        data = b""
        while len(data) <= limit and (chunk := os.read(fd, limit + 1 - len(data))):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > limit:
        raise SpecError(f"larger than {limit // 1024} KiB", where=where, value=path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError("not UTF-8 text (gzip'd or binary user-data is not supported)", where=where,
                        value=path) from None
