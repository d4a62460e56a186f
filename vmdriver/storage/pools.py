"""Opening pools by kind, and a task's disks across every pool.

Backends are found by the ``storage_pools`` block kind in :data:`BACKENDS`
(``module:Class``), imported on first use: the Ceph backend
(:mod:`vmdriver.storage.rbd`, issue 17) needs the Ceph bindings only when a
ceph pool is used. Each backend class has ``from_config(config) -> Pool``.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import cast

from vmdriver.errors import SpecError
from vmdriver.storage.base import Pool, SourceImage, Volume
from vmdriver.storage.config import PoolConfig, StoragePools
from vmdriver.storage.disks import DiskRequest
from vmdriver.storage.errors import StorageUnavailable

#: Pool kind → ``module:Class`` implementing :class:`Pool` with ``from_config``.
BACKENDS: dict[str, str] = {
    "directory": "vmdriver.storage.directory:DirectoryPool",
    "ceph": "vmdriver.storage.rbd:RbdPool",
}


def backend(kind: str, pool: str) -> Callable[[PoolConfig], Pool]:
    """The ``from_config`` of the backend for ``kind``; a clear error if it is missing."""
    target = BACKENDS.get(kind)
    if target is None:
        raise StorageUnavailable(f"storage pool {pool!r}: no backend for {kind} pools")
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and not module_name.startswith(exc.name):
            # The backend exists but a library it needs (e.g. the rbd bindings) does not.
            raise StorageUnavailable(f"storage pool {pool!r}: the {kind} backend needs the "
                                     f"Python module {exc.name!r}") from None
        raise StorageUnavailable(f"storage pool {pool!r} is a {kind} pool; this version of "
                                 f"vmdriver has no {kind} backend yet") from None
    return cast(Callable[[PoolConfig], Pool], getattr(module, cls_name).from_config)


def open_pool(config: PoolConfig) -> Pool:
    """Open one configured pool."""
    return backend(config.kind, config.name)(config)


class Pools:
    """Every configured pool, opened on first use; what a face holds for its lifetime."""

    def __init__(self, config: StoragePools) -> None:
        self.config = config
        self._open: dict[str, Pool] = {}

    def get(self, name: str | None, *, where: str = "pool") -> Pool:
        """The pool called ``name`` (``None``: the default), opened."""
        try:
            cfg = self.config.get(name)
        except KeyError:
            raise SpecError("unknown storage pool", where=where, value=name,
                            allowed=self.config.names) from None
        if cfg.name not in self._open:
            self._open[cfg.name] = open_pool(cfg)
        return self._open[cfg.name]

    def check(self, disks: Sequence[DiskRequest], where: str = "disk") -> None:
        """Refuse, before anything is made, disks naming unknown or unusable pools."""
        for i, disk in enumerate(disks):
            if disk.volume is not None:
                continue  # a Nomad block volume: no pool involved
            pool = self.get(disk.pool, where=f"{where}[{i}].pool")
            # chained stays: whether a chained disk may be raw is the pool's to say.
            pool.volume_request(disk.model_copy(update={"source": None}),
                                alloc_id="00000000", task="check", index=i,
                                where=f"{where}[{i}]")

    def create_task_volumes(self, alloc_id: str, task: str, disks: Sequence[DiskRequest],
                            images: Mapping[int, SourceImage] | None = None, *,
                            exist_ok: bool = False, where: str = "disk") -> list[Volume | None]:
        """A volume per disk (``None`` for Nomad block volumes), in disk order.

        ``images`` holds the opened ``source.image`` of each disk that has one, by
        index. If any volume fails, the ones made by this call are removed again.
        """
        images = images or {}
        made: list[tuple[Pool, Volume]] = []
        out: list[Volume | None] = []
        try:
            for i, disk in enumerate(disks):
                if disk.volume is not None:
                    out.append(None)
                    continue
                pool = self.get(disk.pool, where=f"{where}[{i}].pool")
                req = pool.volume_request(disk, alloc_id=alloc_id, task=task, index=i,
                                          image=images.get(i), where=f"{where}[{i}]")
                vol = pool.create_volume(req, exist_ok=exist_ok)
                out.append(vol)
                if not vol.reused:
                    made.append((pool, vol))
        except BaseException:
            for pool, vol in made:
                with contextlib.suppress(Exception):
                    pool.remove_volume(vol.name)
            raise
        return out

    def local_roots(self) -> tuple[Path, ...]:
        """Directories of the pools that keep volumes as local files (opened here).

        The runtime opens drives through the path policy: the face allows these as
        image paths (the volumes) and backing dirs (chained volumes' bases).
        """
        roots = []
        for cfg in self.config.pools:
            if cfg.kind == "directory":
                root = getattr(self.get(cfg.name), "root", None)
                if isinstance(root, Path):
                    roots.append(root)
        return tuple(roots)

    def remove_task_volumes(self, alloc_id: str, task: str) -> list[str]:
        """Remove the task's volumes from every pool that can be opened."""
        removed: list[str] = []
        for cfg in self.config.pools:
            try:
                pool = self.get(cfg.name)
            except StorageUnavailable:
                continue  # nothing of this task can be there
            removed += pool.remove_task_volumes(alloc_id, task)
        return removed

    def close(self) -> None:
        """Close every opened pool."""
        for pool in self._open.values():
            pool.close()
        self._open.clear()

    def __enter__(self) -> Pools:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
