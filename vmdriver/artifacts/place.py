"""Giving a task its own writable file from a cached one, without ever writing the cache.

qcow2 images get a qcow2 overlay whose backing file is the cached image (milliseconds
and a few hundred KiB, whatever the image size); everything else gets a sparse copy
(``cp --sparse=always --reflink=auto``: holes stay holes, and on btrfs or xfs the copy
shares blocks). Raw images stay raw, so a job that names ``format=raw`` in ``args``
still sees what it asked for. Measurements: docs/artifacts.md.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from vmdriver.artifacts.image import image_info
from vmdriver.artifacts.transfer import DiskFull
from vmdriver.errors import ArtifactError, SpecError


def _run(argv: tuple[str, ...], display: str, what: str) -> None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=3600,
                             stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise ArtifactError(display, f"{argv[0]} is not installed; it is needed to {what}") from None
    if out.returncode != 0:
        msg = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        if "No space left" in msg:
            raise DiskFull(errno.ENOSPC, f"no space left on the disk holding {argv[-1]}")
        raise ArtifactError(display, f"cannot {what}: {msg}")


def place_file(src: Path, dest: Path, display: str, *, cow: bool,
               pin: Callable[[Path], None] | None = None) -> Literal["overlay", "copy"]:
    """Make ``dest`` a private writable version of ``src`` (which is never written).

    With ``cow``, a qcow2 ``src`` without a backing file of its own gets an overlay
    (``pin`` is told about it first, so the cache keeps ``src`` while it exists).
    """
    tmp = dest.with_name(f".{dest.name}.vmdriver-part")
    how: Literal["overlay", "copy"] = "copy"
    if cow:
        try:
            info = image_info(src)
        except SpecError:
            info = None  # not an image QEMU knows: a plain copy is right
        if info is not None and info.format == "qcow2" and info.backing is None:
            how = "overlay"
    try:
        if how == "overlay":
            if pin:
                pin(dest)
            # -F: the overlay records the backing format, so QEMU never probes the cache file.
            _run(("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                  "-b", str(src.absolute()), str(tmp)), display, "create an overlay")
        else:
            _run(("cp", "--reflink=auto", "--sparse=always", "--", str(src), str(tmp)), display,
                 "copy the artifact")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return how
