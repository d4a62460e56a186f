"""Every ``qemu-img`` call the storage layer makes, with the format always explicit.

``qemu-img info`` comes from the one wrapper the project has (imported here and
nowhere else in this package, so moving that wrapper means editing one line).
Errors become :class:`~vmdriver.storage.base.StorageError`, or
:class:`~vmdriver.storage.base.StorageFull` when the disk filled up.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vmdriver.errors import PolicyError, SpecError
from vmdriver.policy.images import KNOWN_FORMATS, qemu_img_info
from vmdriver.storage.errors import StorageError, StorageFull

#: Bound on one qemu-img run: converting a large image on a slow disk takes a while.
TIMEOUT_S = 3600


@dataclass(frozen=True)
class ImageFacts:
    """What ``qemu-img info`` says about a file, checked to be self-contained."""

    format: str
    virtual_size: int
    #: Bytes the file occupies on disk.
    actual_size: int
    backing: str | None = None
    backing_format: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ImageFacts:
        """Back from :func:`dataclasses.asdict` (as remembered in a pool's memo)."""
        fmt, vsize, asize = data.get("format"), data.get("virtual_size"), data.get("actual_size")
        backing, bfmt = data.get("backing"), data.get("backing_format")
        if not (isinstance(fmt, str) and isinstance(vsize, int) and isinstance(asize, int)
                and (backing is None or isinstance(backing, str))
                and (bfmt is None or isinstance(bfmt, str))):
            raise StorageError("a remembered qemu-img answer is malformed")
        return cls(format=fmt, virtual_size=vsize, actual_size=asize, backing=backing,
                   backing_format=bfmt)


def info(name: str, *, fmt: str | None, where: str, display: str,
         pass_fds: tuple[int, ...] = ()) -> dict[str, Any]:
    """``qemu-img info --output=json`` (``-f fmt`` when the format is known)."""
    return qemu_img_info(name, fmt=fmt, where=where, value=display, pass_fds=pass_fds)


def facts(name: str, *, fmt: str | None, where: str, display: str,
          pass_fds: tuple[int, ...] = (), allow_backing: bool = False) -> ImageFacts:
    """The image's format and sizes; refuses what would make QEMU open other files.

    A qcow2 external data file or vmdk extents would have QEMU read a file the pool
    does not control: always refused. A backing file only with ``allow_backing``
    (the pool's own overlays, or a chain the caller's policy already checked).
    """
    data = info(name, fmt=fmt, where=where, display=display, pass_fds=pass_fds)
    found = str(data.get("format", ""))
    if found not in KNOWN_FORMATS:
        raise SpecError("unsupported image format", where=where, value=found,
                        allowed=KNOWN_FORMATS)
    detail = (data.get("format-specific") or {}).get("data") or {}
    if isinstance(detail, dict) and (detail.get("data-file") or any(
            isinstance(e, dict) and e.get("filename") not in (None, name)
            for e in detail.get("extents") or ())):
        raise PolicyError("images that keep data in other files are not allowed here",
                          where=where, value=display, allowed="self-contained images")
    # As recorded in the image: a relative name must not be resolved against /dev/fd.
    backing = data.get("backing-filename")
    if backing and not allow_backing:
        raise PolicyError("image has a backing file", where=where, value=display,
                          allowed="a self-contained image (flatten it with qemu-img convert)")
    return ImageFacts(format=found, virtual_size=int(data.get("virtual-size", 0)),
                      actual_size=int(data.get("actual-size", 0)),
                      backing=str(backing) if backing else None,
                      backing_format=str(data["backing-filename-format"])
                      if data.get("backing-filename-format") else None)


def run(args: Sequence[str], *, what: str, where: str, pass_fds: tuple[int, ...] = ()) -> None:
    """Run ``qemu-img ARGS``; a failure names ``what`` and qemu-img's last line."""
    try:
        out = subprocess.run(("qemu-img", *args), capture_output=True, text=True, check=False,
                             timeout=TIMEOUT_S, stdin=subprocess.DEVNULL, pass_fds=pass_fds)
    except FileNotFoundError:
        raise StorageError(f"qemu-img is not installed; it is needed to {what}",
                           where=where) from None
    except subprocess.TimeoutExpired:
        raise StorageError(f"qemu-img timed out trying to {what}", where=where) from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        if "No space left" in out.stderr or "Disk quota exceeded" in out.stderr:
            raise StorageFull(f"no space left in the pool to {what}", where=where)
        raise StorageError(f"cannot {what}: {last[:300]}", where=where)


def create(path: str, fmt: str, size: int, *, sparse: bool, where: str,
           backing: str | None = None, backing_fmt: str | None = None,
           pass_fds: tuple[int, ...] = ()) -> None:
    """A new image; ``sparse=False`` preallocates every byte (``falloc``)."""
    args = ["create", "-q", "-f", fmt]
    if backing is not None:
        # -u: don't open the backing file (its size is known), so creation is
        # flat in the base's size; -F records its format so QEMU never probes it.
        args += ["-u", "-b", backing, "-F", backing_fmt or "qcow2"]
    if not sparse:
        args += ["-o", "preallocation=falloc"]
    run([*args, "--", path, str(size)], what="create the volume", where=where,
        pass_fds=pass_fds)


def convert(src: str, src_fmt: str, dest: str, dest_fmt: str, *, sparse: bool, where: str,
            pass_fds: tuple[int, ...] = ()) -> None:
    """Write ``src``'s contents into a new ``dest`` image of ``dest_fmt``."""
    args = ["convert", "-q", "-f", src_fmt, "-O", dest_fmt]
    if not sparse:
        args += ["-o", "preallocation=falloc"]
    run([*args, "--", src, dest], what="write the image into the volume", where=where,
        pass_fds=pass_fds)


def resize(path: str, fmt: str, size: int, *, sparse: bool, where: str,
           pass_fds: tuple[int, ...] = ()) -> None:
    """Grow ``path`` to ``size`` bytes (callers never shrink)."""
    args = ["resize", "-q", "-f", fmt]
    if not sparse:
        args.append("--preallocation=falloc")
    run([*args, "--", path, str(size)], what="grow the volume", where=where,
        pass_fds=pass_fds)
