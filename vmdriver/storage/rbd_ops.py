"""The RBD image operations behind :class:`vmdriver.storage.rbd.RbdPool`.

Each operation either completes or undoes what it made: a failed import removes
its image, a failed clone its image and the snapshot it took. Connections are the
pool's business; this module gets an open ``rados.Ioctx``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from vmdriver.errors import SpecError
from vmdriver.storage import qemuimg
from vmdriver.storage.base import SourceImage, VolumeRequest, target_size
from vmdriver.storage.errors import StorageError, StorageFull, StorageUnavailable
from vmdriver.storage.fsutil import content_sha256

_log = logging.getLogger(__name__)

BASE_PREFIX = "base-"
BASE_SNAP = "base"
_BASE_RE = re.compile(r"^base-[0-9a-f]{64}$", re.ASCII)
#: A base without its snapshot, open nowhere and older than this, was left by a crash.
BUILD_GRACE_S = 60
#: A snapshot taken of a source volume for one clone carries the clone's (task volume) name.
_CLONE_SNAP_RE = re.compile(r"^[A-Za-z0-9]{8}-.+-\d{1,6}$", re.ASCII)

#: Seconds a removal waits for the watch of a dead client to expire (the OSDs drop it
#: after osd_client_watch_timeout, 30 s by default).
BUSY_WAIT_S = 40

#: What an operation made: the volume's size and the image it is a clone of.
Made = tuple[int, str | None]

#: ``image name → (qemu-img args, --target-image-opts string)``, from the pool.
TargetFn = Callable[[str], AbstractContextManager[tuple[list[str], str]]]


def bindings() -> tuple[Any, Any]:
    """The ``rados`` and ``rbd`` modules, imported only when a Ceph pool is used."""
    try:
        return importlib.import_module("rados"), importlib.import_module("rbd")
    except ImportError as exc:
        raise StorageUnavailable(f"ceph pools need the Ceph Python bindings ({exc.name}): "
                                 "install python3-rados and python3-rbd") from None


def parent_of(image: Any) -> tuple[str, str, str] | None:
    """``(pool, image, snapshot)`` an open image was cloned from, or None."""
    _, rbd = bindings()
    try:
        pool, name, snap = image.parent_info()
    except rbd.ImageNotFound:
        return None
    return str(pool), str(name), str(snap)


def is_base(name: str) -> bool:
    """True for a shared base image's name (``base-<sha256>``)."""
    return bool(_BASE_RE.match(name))


class ContentHashes:
    """Content hashes of image files, remembered in memory by stat identity.

    ``ctime`` cannot be set from user space, so a file rewritten in place is hashed again.
    """

    def __init__(self) -> None:
        self._known: dict[tuple[int, ...], str] = {}

    def sha256(self, fd: int) -> str:
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if ident not in self._known:
            self._known[ident] = content_sha256(fd)
        return self._known[ident]


def base_name(image: SourceImage, hashes: ContentHashes | None = None) -> str:
    """``base-<sha256>`` of the image's format and content: one base per content."""
    content = (hashes or ContentHashes()).sha256(image.fd)
    return BASE_PREFIX + hashlib.sha256(f"{image.format}\0{content}".encode()).hexdigest()


class Ops:
    """Operations on the images of one pool, for one request (``where`` names it in errors)."""

    def __init__(self, ioctx: Any, where: str, target: TargetFn,
                 hashes: ContentHashes | None = None) -> None:
        self.io = ioctx
        self.where = where
        self.target = target
        self.hashes = hashes
        self.rados, self.rbd = bindings()

    def _error(self, what: str, exc: Exception) -> StorageError:
        if isinstance(exc, self.rbd.DiskQuotaExceeded | self.rbd.NoSpace):
            return StorageFull(f"the Ceph pool is full (quota or space): cannot {what}",
                               where=self.where)
        return StorageError(f"cannot {what}: {exc}", where=self.where)

    def _image(self, name: str, **kw: Any) -> Any:
        return self.rbd.Image(self.io, name, **kw)

    @contextlib.contextmanager
    def _undo(self, name: str, snap_of: str | None = None) -> Iterator[None]:
        """Remove ``name`` (and ``snap_of@name``) if the block fails."""
        try:
            yield
        except BaseException:
            try:
                self.remove(name)
                if snap_of is not None:
                    self._drop_snap(snap_of, name)
            except Exception as exc:  # the first error is the one to report
                # A quota-full pool refuses even removals; the task's destroy retries.
                _log.warning("%s: could not remove half-made %s: %s", self.where, name, exc)
            raise

    # ------------------------------------------------------------------ create

    def create(self, name: str, size: int) -> None:
        """An empty (thin) image of ``size`` bytes."""
        try:
            self.rbd.RBD().create(self.io, name, size, old_format=False)
        except self.rbd.Error as exc:
            raise self._error(f"create image {name}", exc) from None

    def _grow(self, name: str, current: int, size: int) -> None:
        if size > current:
            try:
                with self._image(name) as image:
                    image.resize(size)
            except self.rbd.Error as exc:
                raise self._error(f"grow {name} to {size} bytes", exc) from None

    def _write(self, image: SourceImage, name: str) -> None:
        """Convert ``image`` into the existing (zeroed) RBD image ``name``."""
        with self.target(name) as (objects, opts):
            # -n: the image exists; --target-is-zero: a new RBD image reads as zeros, so
            # qemu-img skips writing zero blocks and the image stays thin.
            qemuimg.run(["convert", "-q", "-n", "--target-is-zero", "-f", image.format, *objects,
                         "--target-image-opts", image.name, opts],
                        what=f"write {image.display} into {name}", where=self.where,
                        pass_fds=(image.fd,))

    def import_image(self, image: SourceImage, name: str, req: VolumeRequest) -> Made:
        """A new image of the final size holding ``image``'s data."""
        size = target_size(req, image.virtual_size)
        self.create(name, size)
        with self._undo(name):
            self._write(image, name)
        return size, None

    def clone_volume(self, source: str, name: str, req: VolumeRequest, *, flatten: bool) -> Made:
        """A copy-on-write clone of ``source`` via its snapshot ``@name``; flattened if asked."""
        try:
            with self._image(source, read_only=True) as image:
                current = int(image.size())
        except self.rbd.ImageNotFound:
            raise SpecError("no such volume in the pool", where=f"{req.where}.source.volume",
                            value=source) from None
        size = target_size(req, current)
        with self._undo(name, snap_of=source):
            try:
                with self._image(source) as image:
                    image.create_snap(name)
                    image.protect_snap(name)
                self.rbd.RBD().clone(self.io, source, name, self.io, name)
            except self.rbd.Error as exc:
                raise self._error(f"clone {source} into {name}", exc) from None
            self._grow(name, current, size)
            if flatten:
                try:
                    with self._image(name) as image:
                        image.flatten()
                except self.rbd.Error as exc:
                    raise self._error(f"flatten {name}", exc) from None
                self._drop_snap(source, name)
                return size, None
        return size, source

    def clone_base(self, image: SourceImage, name: str, req: VolumeRequest) -> Made:
        """A clone of the shared base for ``image``'s content, made first if missing."""
        size = target_size(req, image.virtual_size)
        base = base_name(image, self.hashes)
        for attempt in (1, 2):
            self._ensure_base(base, image)
            try:
                self.rbd.RBD().clone(self.io, base, BASE_SNAP, self.io, name)
                break
            except (self.rbd.ImageNotFound, self.rbd.InvalidArgument) as exc:
                # The last user removed the base between our check and the clone: once more.
                if attempt == 2:
                    raise self._error(f"clone {base} into {name}", exc) from None
            except self.rbd.Error as exc:
                raise self._error(f"clone {base} into {name}", exc) from None
        with self._undo(name):
            self._grow(name, image.virtual_size, size)
        return size, base

    def _ensure_base(self, base: str, image: SourceImage) -> None:
        """Make ``base@base`` (protected) unless it exists; concurrent makers agree on one.

        ``RBD.create`` is atomic (one creator wins, the others get ``ImageExists``), but
        ``RBD.rename`` is not, so the base is built under its final name. Its protected
        snapshot marks it complete; the builder holds it open (a watcher) meanwhile,
        so a base with neither, older than :data:`BUILD_GRACE_S`, is one whose builder
        died: it is removed and built again.
        """
        deadline = time.monotonic() + qemuimg.TIMEOUT_S
        while time.monotonic() < deadline:
            state = self._base_state(base)
            if state == "ready":
                return
            if state == "dead":
                with contextlib.suppress(StorageError):
                    self.remove(base)
            elif state == "absent":
                try:
                    self.rbd.RBD().create(self.io, base, image.virtual_size, old_format=False)
                except self.rbd.ImageExists:
                    continue  # another task is building it
                except self.rbd.Error as exc:
                    raise self._error(f"create base {base}", exc) from None
                self._build_base(base, image)
                return
            time.sleep(0.5)  # another task is building it
        raise StorageError(f"base {base} was not completed in time", where=self.where)

    def _build_base(self, base: str, image: SourceImage) -> None:
        with self._undo(base):
            try:
                building = self._image(base)  # a watcher: others see the build in progress
            except self.rbd.Error as exc:
                raise self._error(f"open base {base}", exc) from None
            with building:
                self._write(image, base)
                try:
                    building.create_snap(BASE_SNAP)
                    building.protect_snap(BASE_SNAP)
                except self.rbd.Error as exc:
                    raise self._error(f"snapshot base {base}", exc) from None
        _log.info("%s: made base %s", self.where, base)

    def _base_state(self, base: str) -> str:
        """``ready``, ``building`` (someone has it open or just made it), ``dead`` or ``absent``."""
        try:
            with self._image(base, read_only=True) as image:
                # A read-only open is not a watcher: only a builder (or a remover) is.
                if BASE_SNAP in {s["name"] for s in image.list_snaps()} \
                        and image.is_protected_snap(BASE_SNAP):
                    return "ready"
                if list(image.watchers_list()):
                    return "building"
                age = datetime.datetime.now() - image.create_timestamp()
        except self.rbd.ImageNotFound:
            return "absent"
        return "building" if age.total_seconds() < BUILD_GRACE_S else "dead"

    # ------------------------------------------------------------------ remove

    def remove(self, name: str) -> bool:
        """Remove image ``name`` with its unused snapshots, then its clone snapshot or base."""
        try:
            with self._image(name) as image:
                parent = parent_of(image)
                for snap in [s["name"] for s in image.list_snaps()]:
                    if not self._drop_own_snap(image, name, snap):
                        raise StorageError(f"volume {name} is the source of clones of "
                                           f"@{snap}; not removed", where=self.where)
        except self.rbd.ImageNotFound:
            return False
        if not self._remove_image(name):
            return False
        if parent is not None and parent[0] == self.io.get_pool_name():
            if is_base(parent[1]) and parent[2] == BASE_SNAP:
                self._drop_base(parent[1])
            elif parent[2] == name:
                self._drop_snap(parent[1], name)
        return True

    def _remove_image(self, name: str) -> bool:
        """``RBD.remove``, waiting out the watch of a client that died (a killed QEMU)."""
        deadline = time.monotonic() + BUSY_WAIT_S
        while True:
            try:
                self.rbd.RBD().remove(self.io, name)
                return True
            except self.rbd.ImageNotFound:
                return False
            except self.rbd.ImageBusy:
                if time.monotonic() > deadline:
                    raise StorageError(f"volume {name} is in use (open in a running VM?)",
                                       where=self.where) from None
                time.sleep(1)
            except self.rbd.Error as exc:
                raise self._error(f"remove {name}", exc) from None

    def _children(self, image: str, snap: str) -> list[Any]:
        with self._image(image, snapshot=snap, read_only=True) as at_snap:
            return list(at_snap.list_children())

    def _drop_own_snap(self, image: Any, name: str, snap: str) -> bool:
        """Drop ``snap`` of the open ``image`` unless clones use it; False if they do."""
        if self._children(name, snap):
            return False
        try:
            if image.is_protected_snap(snap):
                image.unprotect_snap(snap)
            image.remove_snap(snap)
        except self.rbd.ImageBusy:
            return False  # a clone appeared meanwhile
        return True

    def _drop_snap(self, image_name: str, snap: str) -> bool:
        """Drop ``image_name@snap`` if it exists and no clone uses it."""
        try:
            with self._image(image_name) as image:
                if snap not in {s["name"] for s in image.list_snaps()}:
                    return True
                return self._drop_own_snap(image, image_name, snap)
        except self.rbd.ImageNotFound:
            return True

    def _drop_base(self, base: str) -> bool:
        """Remove ``base`` if no clone uses it any more."""
        if not self._drop_snap(base, BASE_SNAP):
            return False
        try:
            self.rbd.RBD().remove(self.io, base)
        except (self.rbd.ImageNotFound, self.rbd.ImageHasSnapshots, self.rbd.ImageBusy):
            return False
        _log.info("%s: removed unused base %s", self.where, base)
        return True

    def collect(self) -> list[str]:
        """Unused bases, stale half-built bases and orphaned clone snapshots; what went."""
        removed = []
        for name in sorted(self.rbd.RBD().list(self.io)):
            if is_base(name):
                state = self._base_state(name)
                gone = self._drop_base(name) if state == "ready" else (
                    state == "dead" and self.remove(name))
                if gone:
                    removed.append(name)
                continue
            snaps: list[str] = []
            with contextlib.suppress(self.rbd.ImageNotFound), self._image(name, read_only=True) as im:
                snaps = [s["name"] for s in im.list_snaps()]
            images = set(self.rbd.RBD().list(self.io))
            for snap in snaps:
                if _CLONE_SNAP_RE.match(snap) and snap not in images and self._drop_snap(name, snap):
                    removed.append(f"{name}@{snap}")
        return removed
