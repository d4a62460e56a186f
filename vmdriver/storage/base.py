"""The pool interface every storage backend implements, and the types it trades in.

A face turns each ``disk`` block into a :class:`VolumeRequest` with
:meth:`Pool.volume_request` (the pool fills its defaults and refuses what it
cannot do), creates volumes with :meth:`Pool.create_volume`, and removes a
task's volumes with :meth:`Pool.remove_task_volumes`. Volumes are named after
the allocation, task and disk index, so a restarted supervisor finds them again
(:meth:`Pool.task_volumes`) without any state of its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from vmdriver.errors import PolicyError, SpecError
from vmdriver.storage import qemuimg
from vmdriver.storage.disks import DiskFormat, DiskRequest

_ALLOC_RE = re.compile(r"^[A-Za-z0-9]{8}", re.ASCII)
#: Longest task name part of a volume name: the whole name stays far below NAME_MAX.
MAX_TASK_NAME = 128
#: Longest backing chain a source image may have.
MAX_CHAIN = 8
#: Longest volume name (Linux NAME_MAX; RBD allows more, nothing here needs it).
MAX_VOLUME_NAME = 255


def check_volume_name(name: object, *, where: str) -> str:
    """``name`` if it is one safe path component: no ``/``, NUL, ``..``, leading dot."""
    if not isinstance(name, str) or not name:
        raise SpecError("volume name must be a non-empty string", where=where, value=name)
    bad = ("/" in name or "\x00" in name or name.startswith(".")
           or len(os.fsencode(name)) > MAX_VOLUME_NAME or not name.isprintable())
    if bad:
        raise SpecError("volume name not allowed", where=where, value=name,
                        allowed="a file name in the pool: no '/', NUL, control characters "
                        f"or leading '.', at most {MAX_VOLUME_NAME} bytes")
    return name


def task_prefix(alloc_id: str, task: str) -> str:
    """``<alloc8>-<task>-``: what every volume of one task starts with."""
    if not _ALLOC_RE.match(alloc_id):
        raise SpecError("allocation id must start with 8 letters or digits", where="alloc_id",
                        value=alloc_id)
    if len(os.fsencode(task)) > MAX_TASK_NAME:
        raise SpecError("task name is too long for a volume name", where="task",
                        value=task[:40], allowed=f"at most {MAX_TASK_NAME} bytes")
    prefix = f"{alloc_id[:8]}-{task}-"
    check_volume_name(prefix, where="task")
    return prefix


def volume_name(alloc_id: str, task: str, index: int, ext: str) -> str:
    """``<alloc8>-<task>-<n>.<ext>`` (``ext`` empty: no suffix, as RBD images have)."""
    if index < 0:
        raise SpecError("disk index must not be negative", where="disk", value=index)
    return task_prefix(alloc_id, task) + str(index) + (f".{ext}" if ext else "")


def task_volume_index(name: str, prefix: str) -> int | None:
    """The disk index if ``name`` is a volume of the task with ``prefix``; else None."""
    if not name.startswith(prefix):
        return None
    m = re.fullmatch(r"(\d{1,6})(\.(?:qcow2|raw))?", name[len(prefix):], re.ASCII)
    return int(m.group(1)) if m else None


class SourceImage:
    """An image a volume is made from: an open, read-only fd and what qemu-img says of it.

    The caller resolves and policy-checks the path (e.g.
    :func:`vmdriver.policy.images.checked_image`); the pool reads only through the
    fd, so a path swapped afterwards cannot change what lands in the volume.
    External data files are always refused. A backing chain (a task's artifact is
    a qcow2 overlay on the artifact cache) only with ``allow_backing``, once the
    caller's policy has checked every file of it; the chain's files are opened
    here too, for hashing, and their formats must be recorded in the images.
    """

    def __init__(self, fd: int, *, fmt: str | None, where: str, display: str,
                 owned: bool = False, allow_backing: bool = False) -> None:
        self.fd = fd
        self.display = display
        self.owned = owned
        #: ``(fd, format)`` of each backing file, nearest first (closed by :meth:`close`).
        self.chain: list[tuple[int, str]] = []
        got = qemuimg.facts(self.name, fmt=fmt, where=where, display=display, pass_fds=(fd,),
                            allow_backing=allow_backing)
        self.format = got.format
        self.virtual_size = got.virtual_size
        try:
            self._open_chain(got, where)
        except BaseException:
            self._close_chain()  # self.fd is the caller's (or open()'s) to close
            raise

    def _open_chain(self, got: qemuimg.ImageFacts, where: str) -> None:
        while got.backing is not None:
            if len(self.chain) >= MAX_CHAIN:
                raise PolicyError("backing chain is too long", where=where, value=self.display,
                                  allowed=f"at most {MAX_CHAIN} images")
            if not got.backing.startswith("/") or got.backing_format is None:
                raise PolicyError("backing file must be named by an absolute path, with its "
                                  "format", where=where, value=got.backing,
                                  allowed="an overlay made with qemu-img create -b /abs -F fmt")
            try:
                bfd = os.open(got.backing, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as exc:
                raise SpecError(f"backing file cannot be opened: {exc.strerror}", where=where,
                                value=got.backing) from None
            self.chain.append((bfd, got.backing_format))
            _check_regular(bfd, where=where, display=got.backing)
            os.set_blocking(bfd, True)
            got = qemuimg.facts(f"/dev/fd/{bfd}", fmt=got.backing_format, where=where,
                                display=got.backing, pass_fds=(bfd,), allow_backing=True)

    @classmethod
    def open(cls, path: Path, *, fmt: str | None = None, where: str,
             display: str | None = None, allow_backing: bool = False) -> SourceImage:
        """Open an already-checked path (never following a final symlink); closed by :meth:`close`."""
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise SpecError(f"image cannot be opened: {exc.strerror}", where=where,
                            value=display or str(path)) from None
        try:
            _check_regular(fd, where=where, display=display or str(path))
            os.set_blocking(fd, True)
            return cls(fd, fmt=fmt, where=where, display=display or str(path), owned=True,
                       allow_backing=allow_backing)
        except BaseException:
            os.close(fd)
            raise

    @property
    def name(self) -> str:
        """What a child process given ``pass_fds=(fd,)`` opens."""
        return f"/dev/fd/{self.fd}"

    def close(self) -> None:
        """Close the backing chain's fds, and the image's if this object opened it."""
        self._close_chain()
        if self.owned and self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def _close_chain(self) -> None:
        for bfd, _ in self.chain:
            with contextlib.suppress(OSError):
                os.close(bfd)
        self.chain = []

    def __enter__(self) -> SourceImage:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _check_regular(fd: int, *, where: str, display: str) -> None:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise SpecError("image is not a regular file", where=where, value=display)


@dataclass(frozen=True)
class VolumeRequest:
    """One volume to create, every default settled by the pool."""

    alloc_id: str
    task: str
    index: int
    format: DiskFormat
    #: Bytes; ``None``: the source's virtual size.
    size: int | None
    sparse: bool
    chained: bool = False
    read_only: bool = False
    image: SourceImage | None = None
    #: A volume of the same pool to clone or chain on.
    volume: str | None = None
    #: For errors: the disk, e.g. ``disk[0]``.
    where: str = ""


@dataclass(frozen=True)
class Volume:
    """A volume in a pool, as the face attaches it."""

    pool: str
    name: str
    format: DiskFormat
    #: Virtual size in bytes.
    size: int
    #: The file, for pools that keep volumes on this host's filesystem.
    path: Path | None
    #: The ``-blockdev`` protocol node (``driver`` and its options) that reaches the data;
    #: the face adds ``node-name``, ``read-only`` and the format node on top.
    protocol: Mapping[str, object] = field(default_factory=dict)
    #: What a chained volume overlays (a base's name), else ``None``.
    backing: str | None = None
    read_only: bool = False
    #: True when ``create_volume(exist_ok=True)`` found it already there.
    reused: bool = False


class Pool(ABC):
    """One storage pool. Implementations: directory (here), ceph (:mod:`.rbd`)."""

    #: The ``storage_pools`` block kind this backend serves.
    kind: ClassVar[str]
    #: Volume formats the backend stores.
    formats: ClassVar[tuple[DiskFormat, ...]] = ("qcow2", "raw")
    default_format: ClassVar[DiskFormat] = "qcow2"

    def __init__(self, name: str) -> None:
        self.name = name

    def default_sparse(self, fmt: DiskFormat) -> bool:
        """nomad-driver-virt's default: thin qcow2, preallocated raw."""
        return fmt == "qcow2"

    def volume_request(self, disk: DiskRequest, *, alloc_id: str, task: str, index: int,
                       image: SourceImage | None = None, where: str = "") -> VolumeRequest:
        """The request for ``disk``, defaults filled; refuses what this pool cannot store."""
        where = where or f"disk[{index}]"
        fmt = disk.format or ("raw" if disk.kind == "cdrom" else self.default_format)
        if fmt not in self.formats:
            raise SpecError(f"a {self.kind} pool stores only {', '.join(self.formats)} volumes",
                            where=f"{where}.format", value=fmt, allowed=self.formats)
        src = disk.source
        if src is not None and src.image is not None and image is None:
            raise SpecError("source.image was not opened by the caller", where=f"{where}.source")
        if src is not None and src.volume is not None:
            check_volume_name(src.volume, where=f"{where}.source.volume")
        sparse = disk.sparse
        if sparse is None:
            # Preallocating a read-only medium buys nothing: a cdrom is copied as it is.
            sparse = disk.kind == "cdrom" or self.default_sparse(fmt)
        return VolumeRequest(
            alloc_id=alloc_id, task=task, index=index, format=fmt, size=disk.size,
            sparse=sparse, chained=disk.chained, read_only=disk.read_only,
            image=image if src is not None and src.image is not None else None,
            volume=src.volume if src is not None else None, where=where)

    @abstractmethod
    def create_volume(self, req: VolumeRequest, *, exist_ok: bool = False) -> Volume:
        """Create the volume ``req`` names; nothing is left behind if this raises.

        With ``exist_ok``, an existing volume of that name is returned as is
        (``reused=True``): a restarted task keeps its disk.
        """

    @abstractmethod
    def task_volumes(self, alloc_id: str, task: str) -> list[Volume]:
        """The volumes this pool holds for one task, by disk index."""

    @abstractmethod
    def remove_task_volumes(self, alloc_id: str, task: str) -> list[str]:
        """Remove every volume of one task (and bases no volume uses); return their names."""

    @abstractmethod
    def remove_volume(self, name: str) -> bool:
        """Remove one volume (and its base if no one else uses it); True if it existed."""

    @abstractmethod
    def has_volume(self, name: str) -> bool:
        """True if a volume called ``name`` exists in this pool."""

    @abstractmethod
    def collect_bases(self) -> list[str]:
        """Remove bases no volume uses (after a crash); return their names."""

    def close(self) -> None:  # noqa: B027 (most backends hold nothing open)
        """Release what the pool holds open."""

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _human(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


def target_size(req: VolumeRequest, source: int) -> int:
    """The volume's size: the request's, never less than the source's."""
    if req.size is None:
        return source
    if req.size < source:
        raise SpecError(f"size {_human(req.size)} is smaller than the source's "
                        f"{_human(source)}; a disk is never shrunk", where=f"{req.where}.size",
                        value=req.size, allowed=f">= {source} bytes")
    return req.size
