"""Directory pools: one file per volume in an operator's directory.

Every name is one path component checked by
:func:`~vmdriver.storage.base.check_volume_name`, and every file operation goes
through the pool's directory fd with ``O_NOFOLLOW`` (:mod:`.fsutil`), so a
hostile name or a symlink planted in the pool cannot reach outside it.
qemu-img is given ``/proc/self/fd/<dirfd>/<name>`` for the same reason.
A volume is built under a temporary name in ``.vmdriver/tmp`` and linked into
place only when complete; any exception removes the temporary file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

from vmdriver.errors import SpecError
from vmdriver.storage import bases as basestore
from vmdriver.storage import fsutil, qemuimg
from vmdriver.storage.base import (
    Pool,
    SourceImage,
    Volume,
    VolumeRequest,
    check_volume_name,
    target_size,
    task_prefix,
    task_volume_index,
    volume_name,
)
from vmdriver.storage.config import DirectoryPoolConfig
from vmdriver.storage.disks import DiskFormat, DiskRequest
from vmdriver.storage.errors import StorageError

META = ".vmdriver"
_TMP_RE = re.compile(r"\.(\d+)\.[0-9a-f]{8}\.part$", re.ASCII)
#: Any task's volume (``<alloc8>-<task>-<n>.<fmt>``): never a base to chain on.
_TASK_VOLUME_RE = re.compile(r"^[A-Za-z0-9]{8}-.+-\d{1,6}\.(qcow2|raw)$", re.ASCII)


class DirectoryPool(Pool):
    """Volumes as files in a host directory (raw or qcow2)."""

    kind = "directory"

    def __init__(self, name: str, path: Path) -> None:
        super().__init__(name)
        try:
            os.makedirs(path, 0o700, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"pool directory {path} cannot be created: {exc.strerror}",
                               where=f"storage pool {name!r}") from None
        #: Resolved once: the operator's own symlinks to the pool are followed here only.
        self.root = Path(os.path.realpath(path))
        self._fds: list[int] = []
        self.fd = self._keep(fsutil.open_dir(str(self.root), dir_fd=None))
        meta = self._keep(fsutil.open_dir(META, dir_fd=self.fd, create=True))
        self.tmp_fd = self._keep(fsutil.open_dir("tmp", dir_fd=meta, create=True))
        bases_fd = self._keep(fsutil.open_dir("bases", dir_fd=meta, create=True))
        self.refs = basestore.BaseRefs(
            bases_fd, self._keep(fsutil.open_dir("refs", dir_fd=meta, create=True)),
            self._keep(fsutil.open_dir("locks", dir_fd=meta, create=True)))
        self.memo = basestore.StatMemo(
            self._keep(fsutil.open_dir("memo", dir_fd=meta, create=True)))
        self._sweep_tmp()

    def volume_request(self, disk: DiskRequest, *, alloc_id: str, task: str, index: int,
                       image: SourceImage | None = None, where: str = "") -> VolumeRequest:
        """As :meth:`Pool.volume_request`; a chained disk here is a qcow2 overlay, never raw."""
        where = where or f"disk[{index}]"
        if disk.chained and disk.format == "raw":
            raise SpecError("a chained disk in a directory pool is a qcow2 overlay",
                            where=f"{where}.format", value="raw",
                            allowed="qcow2, or chained = false, or a ceph pool")
        return super().volume_request(disk, alloc_id=alloc_id, task=task, index=index,
                                      image=image, where=where)

    @classmethod
    def from_config(cls, config: DirectoryPoolConfig) -> DirectoryPool:
        """Open (creating its directory if needed) the pool ``config`` describes."""
        return cls(config.name, config.path)

    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        """Close the directory fds."""
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def _sweep_tmp(self) -> None:
        """Remove what a killed creator left in ``tmp`` (its pid is gone)."""
        for entry in os.listdir(self.tmp_fd):
            m = _TMP_RE.search(entry)
            if m and not _alive(int(m.group(1))):
                fsutil.unlink(entry, self.tmp_fd)

    def _proc(self, dir_fd: int, name: str) -> str:
        """The path a child given ``pass_fds=(dir_fd,)`` opens ``name`` in ``dir_fd`` by."""
        return f"/proc/self/fd/{dir_fd}/{name}"

    def path_of(self, name: str) -> Path:
        """The file a volume lives in (for QEMU, which opens it later)."""
        return self.root / check_volume_name(name, where="volume")

    def has_volume(self, name: str) -> bool:
        """True if ``name`` exists in the pool."""
        return fsutil.exists(check_volume_name(name, where="volume"), self.fd)

    @contextlib.contextmanager
    def _building(self, name: str, where: str, dest_fd: int | None = None) -> Iterator[str]:
        """A temporary name in ``tmp``; published as ``name`` on success, removed on failure."""
        tmp = f"{name[:200]}.{os.getpid()}.{secrets.token_hex(4)}.part"
        try:
            yield tmp
            fd = fsutil.open_file(tmp, self.tmp_fd, where=where)
            try:
                os.fchmod(fd, 0o400 if dest_fd is not None else 0o600)
                if dest_fd is not None:
                    os.fsync(fd)  # a base is shared: it must be whole on disk before it is seen
            finally:
                os.close(fd)
            fsutil.publish(tmp, self.tmp_fd, name, self.fd if dest_fd is None else dest_fd,
                           where=where)
        except BaseException:
            fsutil.unlink(tmp, self.tmp_fd)
            raise

    def create_volume(self, req: VolumeRequest, *, exist_ok: bool = False) -> Volume:
        """Create the volume; see :meth:`Pool.create_volume`."""
        name = volume_name(req.alloc_id, req.task, req.index, req.format)
        where = req.where or name
        if fsutil.exists(name, self.fd):
            if exist_ok:
                return self._existing(name, req.format, where, read_only=req.read_only)
            raise StorageError(f"volume {name!r} already exists in pool {self.name!r}",
                               where=where)
        if req.chained:
            return self._chained(name, req, where)
        with self._building(name, where) as tmp:
            if req.image is not None:
                size = self._from_image(tmp, req, where)
            elif req.volume is not None:
                size = self._from_volume(tmp, req, where)
            else:
                size = req.size or 0
                qemuimg.create(self._proc(self.tmp_fd, tmp), req.format, size,
                               sparse=req.sparse, where=where, pass_fds=(self.tmp_fd,))
        return self._volume(name, req.format, size, read_only=req.read_only)

    def _volume(self, name: str, fmt: DiskFormat, size: int, *, backing: str | None = None,
                read_only: bool = False, reused: bool = False) -> Volume:
        path = self.root / name
        return Volume(pool=self.name, name=name, format=fmt, size=size, path=path,
                      protocol={"driver": "file", "filename": str(path)}, backing=backing,
                      read_only=read_only, reused=reused)

    def _existing(self, name: str, fmt: DiskFormat, where: str, *,
                  read_only: bool = False) -> Volume:
        fd = fsutil.open_file(name, self.fd, where=where)
        try:
            got = qemuimg.facts(f"/dev/fd/{fd}", fmt=fmt, where=where, display=name,
                                pass_fds=(fd,), allow_backing=True)
        finally:
            os.close(fd)
        if got.backing is not None and Path(got.backing).parent not in (
                self.root, self.root / META / "bases"):
            # Not an overlay this pool made: it would have QEMU open a file elsewhere.
            raise StorageError(f"volume {name!r} has a backing file outside the pool",
                               where=where)
        base = self.refs.base_of(name) if got.backing else None
        return self._volume(name, fmt, got.virtual_size, backing=base, read_only=read_only,
                            reused=True)

    def _grow(self, tmp: str, fmt: str, current: int, size: int, req: VolumeRequest,
              where: str) -> None:
        if size > current:
            qemuimg.resize(self._proc(self.tmp_fd, tmp), fmt, size, sparse=req.sparse,
                           where=where, pass_fds=(self.tmp_fd,))

    def _from_image(self, tmp: str, req: VolumeRequest, where: str) -> int:
        image = req.image
        assert image is not None
        size = target_size(req, image.virtual_size)
        if image.format == req.format and req.sparse and not image.chain:
            self._clone_into(tmp, image.fd, where)
        else:
            qemuimg.convert(image.name, image.format, self._proc(self.tmp_fd, tmp), req.format,
                            sparse=req.sparse, where=where, pass_fds=(image.fd, self.tmp_fd))
        self._grow(tmp, req.format, image.virtual_size, size, req, where)
        return size

    def _clone_into(self, tmp: str, src_fd: int, where: str, *, preallocate: bool = False) -> None:
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=self.tmp_fd)
        try:
            fsutil.clone(src_fd, dst, where=where)
            if preallocate:
                try:
                    os.posix_fallocate(dst, 0, os.fstat(dst).st_size)
                except OSError as exc:
                    raise fsutil.copy_error(exc, where) from None
        finally:
            os.close(dst)

    def _source_volume(self, req: VolumeRequest, where: str) -> tuple[int, qemuimg.ImageFacts]:
        """Open ``source.volume`` (never through a symlink) and check it is self-contained."""
        assert req.volume is not None
        name = check_volume_name(req.volume, where=f"{where}.source.volume")
        fd = fsutil.open_file(name, self.fd, where=f"{where}.source.volume")
        try:
            fmt = {"qcow2": "qcow2", "raw": "raw"}.get(name.rsplit(".", 1)[-1])
            got = qemuimg.ImageFacts.from_dict(self.memo.remember(
                fd, f"facts-{fmt or 'probed'}", lambda: dataclasses.asdict(qemuimg.facts(
                    f"/dev/fd/{fd}", fmt=fmt, where=f"{where}.source.volume", display=name,
                    pass_fds=(fd,)))))
        except BaseException:
            os.close(fd)
            raise
        return fd, got

    def _from_volume(self, tmp: str, req: VolumeRequest, where: str) -> int:
        fd, src = self._source_volume(req, where)
        try:
            size = target_size(req, src.virtual_size)
            if src.format == req.format and (req.sparse or req.format == "raw"):
                self._clone_into(tmp, fd, where, preallocate=not req.sparse)
            else:
                qemuimg.convert(f"/dev/fd/{fd}", src.format, self._proc(self.tmp_fd, tmp),
                                req.format, sparse=req.sparse, where=where,
                                pass_fds=(fd, self.tmp_fd))
            self._grow(tmp, req.format, src.virtual_size, size, req, where)
            return size
        finally:
            os.close(fd)

    def _chained(self, name: str, req: VolumeRequest, where: str) -> Volume:
        if req.image is None:
            return self._chained_on_volume(name, req, where)
        image = req.image
        base = basestore.base_name(image, basestore.content_key(image, self.memo))
        size = target_size(req, image.virtual_size)
        bfmt = basestore.base_format(image)
        with self.refs.locked(base):
            if not fsutil.exists(base, self.refs.bases_fd):
                self._make_base(base, bfmt, where, image)
            self.refs.add(base, name)
            try:
                self._overlay(name, self.root / META / "bases" / base, bfmt, size, where)
            except BaseException:
                self.refs.drop(base, name)
                raise
        return self._volume(name, "qcow2", size, backing=base, read_only=req.read_only)

    def _make_base(self, base: str, fmt: str, where: str, image: SourceImage) -> None:
        with self._building(base, where, dest_fd=self.refs.bases_fd) as tmp:
            if image.format == fmt and not image.chain:
                self._clone_into(tmp, image.fd, where)
            else:  # flattens a chain: the base never depends on the artifact cache
                qemuimg.convert(image.name, image.format, self._proc(self.tmp_fd, tmp), fmt,
                                sparse=True, where=where, pass_fds=(image.fd, self.tmp_fd))
        fsutil.fsync_dir(self.refs.bases_fd)

    def _overlay(self, name: str, backing: Path, bfmt: str, size: int, where: str) -> None:
        with self._building(name, where) as tmp:
            qemuimg.create(self._proc(self.tmp_fd, tmp), "qcow2", size, sparse=True,
                           where=where, backing=str(backing), backing_fmt=bfmt,
                           pass_fds=(self.tmp_fd,))

    def _chained_on_volume(self, name: str, req: VolumeRequest, where: str) -> Volume:
        """An overlay on an operator's volume (kept by the operator; nothing counts its users)."""
        assert req.volume is not None
        if _TASK_VOLUME_RE.match(req.volume):
            raise SpecError("a chained disk needs a base that never changes; this is another "
                            "task's volume", where=f"{where}.source.volume", value=req.volume,
                            allowed="a volume the operator placed in the pool, or chained = "
                            "false for a full clone")
        fd, src = self._source_volume(req, where)
        os.close(fd)
        size = target_size(req, src.virtual_size)
        self._overlay(name, self.root / req.volume, src.format, size, where)
        return self._volume(name, "qcow2", size, backing=req.volume, read_only=req.read_only)

    def task_volumes(self, alloc_id: str, task: str) -> list[Volume]:
        """The task's volumes by disk index (as found after a restart)."""
        prefix = task_prefix(alloc_id, task)
        found = sorted((i, n) for n in os.listdir(self.fd)
                       if (i := task_volume_index(n, prefix)) is not None)
        out = []
        for _, name in found:
            fmt: DiskFormat = "raw" if name.endswith(".raw") else "qcow2"
            out.append(self._existing(name, fmt, name))
        return out

    def remove_task_volumes(self, alloc_id: str, task: str) -> list[str]:
        """Remove the task's volumes, then each base no other volume uses."""
        prefix = task_prefix(alloc_id, task)
        removed = [name for name in sorted(os.listdir(self.fd))
                   if task_volume_index(name, prefix) is not None and self.remove_volume(name)]
        fsutil.fsync_dir(self.fd)
        return removed

    def remove_volume(self, name: str) -> bool:
        """Remove one volume, then its base if it was the last user."""
        check_volume_name(name, where="volume")
        base = self.refs.base_of(name)
        existed = fsutil.unlink(name, self.fd)
        if base is not None:
            with self.refs.locked(base):
                self.refs.drop(base, name)
        return existed

    def collect_bases(self) -> list[str]:
        """Drop refs of volumes that are gone (a crash between steps) and unused bases."""
        removed = []
        for base in self.refs.all_bases():
            with self.refs.locked(base):
                users = self.refs.users(base)
                dead = [u for u in users if not fsutil.exists(u, self.fd)]
                gone = False
                for user in dead:
                    gone = self.refs.drop(base, user) or gone
                if not users:
                    gone = self.refs.drop(base, "") or gone
                if gone:
                    removed.append(base)
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
