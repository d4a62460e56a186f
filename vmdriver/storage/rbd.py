"""Ceph RBD pools: VM disks as RBD images, through librados/librbd (Debian's python3-rados/-rbd).

Keyring-free: the monitors, user and key come from the ``ceph "NAME" {}`` block and
go to librados as configuration values in memory; no ``ceph.conf``, no keyring file,
nothing under ``/etc/ceph`` is read. Every wait is bounded (``timeout``): unreachable
monitors or a wrong key fail in seconds instead of librados' default five minutes.

How each disk semantic maps onto RBD (images are always raw and thin):

* empty disk: ``RBD.create`` of ``size``;
* ``source.image``: a new image of the final size, the image's data written into it
  by ``qemu-img convert`` (any format it reads; zeros are skipped);
* ``source.volume``: snapshot ``@<new volume>`` of the source, protected, cloned
  (copy-on-write); with ``flatten_clones`` the clone is flattened and the snapshot
  dropped, so the copy no longer depends on its source;
* ``chained`` on an image: a clone of ``base-<sha256>@base``, a shared base image made
  once per image content. Its protected snapshot marks it complete, so no clone ever
  sees a half-written base (see :meth:`rbd_ops.Ops._ensure_base`);
* removal: the volume, its ``@<volume>`` snapshot on a source volume, and its base
  once no clone uses it (``list_children``).

QEMU reaches a volume through :meth:`RbdPool.protocol` (``-blockdev driver=rbd``)
plus the key in a ``-object secret`` file written by :meth:`RbdPool.write_secret_file`:
the key never appears in argv, logs, reprs or error messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import socket
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from vmdriver.errors import SpecError
from vmdriver.spec import RbdMedium
from vmdriver.storage.base import (
    Pool,
    SourceImage,
    Volume,
    VolumeRequest,
    check_volume_name,
    task_prefix,
    task_volume_index,
    volume_name,
)
from vmdriver.storage.config import CephPoolConfig
from vmdriver.storage.disks import DiskFormat, DiskRequest
from vmdriver.storage.errors import StorageError
from vmdriver.storage.rbd_ops import ContentHashes, Ops, bindings, parent_of

_log = logging.getLogger(__name__)

#: Seconds allowed for reaching the monitors and for each monitor command.
DEFAULT_TIMEOUT_S = 10.0
#: Seconds one OSD operation may take before it fails instead of waiting forever.
OSD_OP_TIMEOUT_S = 60
_DEFAULT_PORT = 3300


@dataclass(frozen=True)
class Monitor:
    """One monitor address from ``hosts``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_monitors(hosts: tuple[str, ...]) -> tuple[Monitor, ...]:
    """``host:port``, ``[v6]:port`` or a bare host (port 3300) → monitors."""
    out = []
    for entry in hosts:
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", entry)
        if m is None:
            raise SpecError("not a monitor address", where="storage_pools.ceph.hosts", value=entry,
                            allowed="host:port or [ipv6]:port")
        host = m.group(1) or m.group(3)
        out.append(Monitor(host, int(m.group(2) or m.group(4) or _DEFAULT_PORT)))
    return tuple(out)


class RbdPool(Pool):
    """One ``ceph "NAME" { pool, hosts, authentication }`` block: images in a Ceph pool."""

    kind = "ceph"
    formats: ClassVar[tuple[DiskFormat, ...]] = ("raw",)
    default_format: ClassVar[DiskFormat] = "raw"

    def __init__(self, config: CephPoolConfig, *, timeout: float = DEFAULT_TIMEOUT_S,
                 flatten_clones: bool = False) -> None:
        super().__init__(config.name)
        self.config = config
        self.monitors = parse_monitors(config.hosts)
        self.timeout = timeout
        self.flatten_clones = flatten_clones
        self._lock = threading.Lock()
        self._cluster: Any = None
        self._ioctx: Any = None
        self._hashes = ContentHashes()

    @classmethod
    def from_config(cls, config: CephPoolConfig) -> RbdPool:
        """The pool ``config`` describes; nothing is contacted until first use."""
        return cls(config)

    def __repr__(self) -> str:
        return (f"RbdPool({self.name!r}, pool={self.config.pool!r}, "
                f"user={self.user!r}, monitors={self.monitor_list!r})")

    @property
    def user(self) -> str:
        """The cephx user, without ``client.``."""
        return self.config.authentication.username

    @property
    def monitor_list(self) -> str:
        return ", ".join(str(m) for m in self.monitors)

    def _where(self) -> str:
        return f"storage pool {self.name!r} (ceph pool {self.config.pool!r})"

    # ------------------------------------------------------------------ connection

    def _conf(self) -> dict[str, str]:
        t = str(max(1, round(self.timeout)))
        return {
            "mon_host": ",".join(str(m) for m in self.monitors),
            "key": self.config.authentication.secret.get_secret_value(),
            "keyring": "",  # keyring-free: never look for a keyring file
            "client_mount_timeout": t,
            "rados_mon_op_timeout": t,
            "rados_osd_op_timeout": str(OSD_OP_TIMEOUT_S),
            "log_to_stderr": "false",
            "err_to_stderr": "false",
            "log_file": "",
        }

    def ioctx(self) -> Any:
        """The pool's ``rados.Ioctx``, connecting on first use (bounded by ``timeout``)."""
        with self._lock:
            if self._ioctx is None:
                self._ioctx = self._connect()
            return self._ioctx

    def _connect(self) -> Any:
        rados, _ = bindings()
        self._probe_monitors()
        # conffile=None: read no ceph.conf at all; the environment is not parsed either.
        cluster = rados.Rados(rados_id=self.user, conffile=None, conf=self._conf())
        try:
            cluster.connect()
            ioctx = cluster.open_ioctx(self.config.pool)
        except rados.TimedOut:
            cluster.shutdown()
            raise StorageError(
                f"monitors {self.monitor_list} did not accept client.{self.user} within "
                f"{self.timeout:.0f} s: wrong key, unknown user, or no monitor quorum",
                where=self._where()) from None
        except rados.PermissionError:
            cluster.shutdown()
            raise StorageError(f"client.{self.user} may not use this pool (wrong key or "
                               "missing caps)", where=self._where()) from None
        except rados.ObjectNotFound:
            cluster.shutdown()
            raise StorageError("no such pool in the Ceph cluster", where=self._where()) from None
        except rados.Error as exc:
            cluster.shutdown()
            raise StorageError(f"cannot connect as client.{self.user} to monitors "
                               f"{self.monitor_list}: {exc}", where=self._where()) from None
        # Fail with EDQUOT/ENOSPC when the pool is full instead of pausing until space
        # appears: a task start must fail, not hang.
        ioctx.set_osdmap_full_try()
        self._cluster = cluster
        return ioctx

    def _probe_monitors(self) -> None:
        """Tell "nothing listens" from "wrong credentials": librados times out on both."""
        errors = []
        for mon in self.monitors:
            try:
                with socket.create_connection((mon.host, mon.port), timeout=min(3.0, self.timeout)):
                    return
            except OSError as exc:
                errors.append(f"{mon}: {exc.strerror or exc}")
        raise StorageError(f"no Ceph monitor reachable ({'; '.join(errors)})", where=self._where())

    def close(self) -> None:
        """Disconnect from the cluster."""
        with self._lock:
            if self._ioctx is not None:
                self._ioctx.close()
            if self._cluster is not None:
                self._cluster.shutdown()
            self._ioctx = self._cluster = None

    # ------------------------------------------------------------------ requests

    def default_sparse(self, fmt: DiskFormat) -> bool:
        """RBD images are always thin."""
        return True

    def volume_request(self, disk: DiskRequest, *, alloc_id: str, task: str, index: int,
                       image: SourceImage | None = None, where: str = "") -> VolumeRequest:
        """As :meth:`Pool.volume_request`; a preallocated RBD image is refused (as the virt driver)."""
        where = where or f"disk[{index}]"
        if disk.sparse is False:
            raise SpecError("sparse cannot be disabled for ceph volumes", where=f"{where}.sparse",
                            value=False, allowed="true (RBD images are thin)")
        return super().volume_request(disk, alloc_id=alloc_id, task=task, index=index,
                                      image=image, where=where)

    # ------------------------------------------------------------------ QEMU

    def protocol(self, image: str, secret_id: str | None = None) -> dict[str, object]:
        """The ``-blockdev driver=rbd`` node for ``image``.

        ``key-secret`` names the ``-object secret`` (``format=base64``) whose file
        :meth:`write_secret_file` wrote; without ``secret_id`` the face adds it.
        ``conf=/dev/null``: QEMU reads no ``/etc/ceph/ceph.conf`` either.
        """
        node: dict[str, object] = {
            "driver": "rbd", "pool": self.config.pool, "image": image,
            "server": [{"host": m.host, "port": str(m.port)} for m in self.monitors],
            "user": self.user, "auth-client-required": ["cephx"], "conf": "/dev/null"}
        if secret_id is not None:
            node["key-secret"] = secret_id
        return node

    def medium(self, image: str) -> RbdMedium:
        """The spec's medium for ``image``; its ``secret_ref`` is this pool's name.

        The runtime resolves the ref to this pool and calls :meth:`write_secret_file`
        for the drive's ``-object secret``.
        """
        return volume_medium(self.name, self.protocol(image))

    def write_secret_file(self, path: Path) -> Path:
        """Write the key (``format=base64`` for ``-object secret``) to a new 0600 file."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.config.authentication.secret.get_secret_value())
        return path

    # ------------------------------------------------------------------ create

    def create_volume(self, req: VolumeRequest, *, exist_ok: bool = False) -> Volume:
        """Create the volume ``req`` names; nothing is left behind if this raises."""
        name = volume_name(req.alloc_id, req.task, req.index, "")
        if self.has_volume(name):
            if not exist_ok:
                raise StorageError(f"volume {name} already exists", where=req.where)
            return self._volume(name, read_only=req.read_only, reused=True)
        ops = self._ops(req.where)
        if req.volume is not None:
            flatten = self.flatten_clones and not req.chained
            size, backing = ops.clone_volume(req.volume, name, req, flatten=flatten)
        elif req.image is not None and req.chained:
            size, backing = ops.clone_base(req.image, name, req)
        elif req.image is not None:
            size, backing = ops.import_image(req.image, name, req)
        elif req.size is not None:
            ops.create(name, req.size)
            size, backing = req.size, None
        else:
            raise SpecError("an empty disk needs a size", where=f"{req.where}.size")
        _log.info("pool %s: created volume %s", self.name, name)
        return Volume(pool=self.name, name=name, format="raw", size=size, path=None,
                      protocol=self.protocol(name), backing=backing, read_only=req.read_only)

    def _volume(self, name: str, *, read_only: bool = False, reused: bool = False) -> Volume:
        _, rbd = bindings()
        try:
            with rbd.Image(self.ioctx(), name, read_only=True) as image:
                size = int(image.size())
                parent = parent_of(image)
        except rbd.Error as exc:
            raise StorageError(f"cannot open volume {name}: {exc}", where=self._where()) from None
        return Volume(pool=self.name, name=name, format="raw", size=size, path=None,
                      protocol=self.protocol(name), backing=parent[1] if parent else None,
                      read_only=read_only, reused=reused)

    # ------------------------------------------------------------------ list, remove

    def images(self) -> list[str]:
        """Every image in the pool, sorted."""
        _, rbd = bindings()
        try:
            return sorted(rbd.RBD().list(self.ioctx()))
        except rbd.Error as exc:
            raise StorageError(f"cannot list images: {exc}", where=self._where()) from None

    def has_volume(self, name: str) -> bool:
        """True if an image called ``name`` exists in the pool."""
        return name in self.images()

    def task_volumes(self, alloc_id: str, task: str) -> list[Volume]:
        """The task's volumes, by disk index."""
        prefix = task_prefix(alloc_id, task)
        found = [(task_volume_index(n, prefix), n) for n in self.images()]
        return [self._volume(n) for i, n in sorted((i, n) for i, n in found if i is not None)]

    def remove_task_volumes(self, alloc_id: str, task: str) -> list[str]:
        """Remove the task's volumes, their clone snapshots, and bases no clone uses."""
        prefix = task_prefix(alloc_id, task)
        pending = [n for n in self.images() if task_volume_index(n, prefix) is not None]
        removed: list[str] = []
        # A task's volume may be the source of another of its volumes (source.volume):
        # clones go first, so repeat while a pass removes something.
        while pending:
            failed: dict[str, str] = {}
            for name in pending:
                try:
                    if self.remove_volume(name):
                        removed.append(name)
                except StorageError as exc:
                    failed[name] = exc.message
            if not failed:
                break
            if len(failed) == len(pending):
                raise StorageError("; ".join(failed.values()), where=self._where())
            pending = list(failed)
        return removed

    def remove_volume(self, name: str) -> bool:
        """Remove one volume, its clone snapshot and, if it was the last user, its base."""
        check_volume_name(name, where="volume")
        return self._ops(self._where()).remove(name)

    def collect_bases(self) -> list[str]:
        """Remove bases and clone snapshots no clone uses (left by a crash)."""
        return self._ops(self._where()).collect()

    def _ops(self, where: str) -> Ops:
        return Ops(self.ioctx(), where, self.qemu_img_target, self._hashes)

    @contextlib.contextmanager
    def qemu_img_target(self, image: str) -> Iterator[tuple[list[str], str]]:
        """``qemu-img`` args (``--object secret``) and ``--target-image-opts`` for ``image``.

        The key goes through a 0600 file in a private temp dir, never argv; a small
        ``ceph.conf`` there bounds librados' waits inside qemu-img.
        """
        with tempfile.TemporaryDirectory(prefix="vmd-rbd-") as tmp:
            key = self.write_secret_file(Path(tmp) / "key")
            conf = Path(tmp) / "ceph.conf"
            t = max(1, round(self.timeout))
            conf.write_text(f"[global]\nclient_mount_timeout = {t}\nrados_mon_op_timeout = {t}\n"
                            f"rados_osd_op_timeout = {OSD_OP_TIMEOUT_S}\n"
                            "log_to_stderr = false\nerr_to_stderr = false\n")
            secret_id = f"vmd-{secrets.token_hex(4)}"
            servers = ",".join(f"server.{i}.host={m.host},server.{i}.port={m.port}"
                               for i, m in enumerate(self.monitors))
            opts = (f"driver=rbd,pool={self.config.pool},image={image},{servers},"
                    f"user={self.user},key-secret={secret_id},conf={conf},"
                    "auth-client-required.0=cephx")
            yield ["--object", f"secret,id={secret_id},file={key},format=base64"], opts


def volume_medium(pool_name: str, protocol: Mapping[str, object]) -> RbdMedium:
    """The spec's medium for an RBD volume from its ``-blockdev`` node (:meth:`RbdPool.protocol`).

    What :func:`vmdriver.storage.attach.drive_for` uses: a :class:`Volume` carries
    its pool's name and protocol node, so the face needs no pool object to attach it.
    """
    servers = protocol.get("server")
    if protocol.get("driver") != "rbd" or not isinstance(servers, list):
        raise StorageError("not an RBD volume", where=f"storage pool {pool_name!r}")
    monitors = tuple(str(Monitor(str(s["host"]), int(s["port"]))) for s in servers)
    return RbdMedium(pool=str(protocol["pool"]), image=str(protocol["image"]), monitors=monitors,
                     user=str(protocol["user"]), secret_ref=pool_name)


__all__ = ["Monitor", "RbdPool", "parse_monitors", "volume_medium"]
