"""Errors of the storage layer, on the project's tree (:mod:`vmdriver.errors`).

Bad disk fields raise :class:`~vmdriver.errors.SpecError`; a pool's own
failures raise these. Each carries ``where`` (the disk, e.g. ``disk[0]``) so a
face can show one line.
"""

from __future__ import annotations

from vmdriver.errors import HostError, VmdriverError


class StorageError(VmdriverError):
    """A volume could not be created, read or removed."""

    def __init__(self, message: str, *, where: str = "") -> None:
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class StorageFull(StorageError):
    """The pool's filesystem (or Ceph pool) ran out of space; nothing was left behind."""


class StorageUnavailable(HostError):
    """A configured pool's backend is not available on this host (e.g. Ceph before issue 17)."""
