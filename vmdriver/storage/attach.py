"""A created volume as the spec's :class:`~vmdriver.spec.Drive`: what the virt face hands the core.

Directory volumes become a :class:`~vmdriver.spec.FileMedium` with the format
always given. The runtime opens drives through the path policy, so the face
allows each directory pool's root (:meth:`vmdriver.storage.pools.Pools.local_roots`)
as an image path (the volumes) and as a backing dir (bases, golden volumes).
"""

from __future__ import annotations

from vmdriver.spec import Bus, Drive, FileMedium
from vmdriver.storage.base import Volume
from vmdriver.storage.disks import DiskRequest
from vmdriver.storage.errors import StorageError


def drive_for(disk: DiskRequest, volume: Volume, index: int) -> Drive:
    """The drive for disk ``index``: the primary boots first, ``devname`` is its serial."""
    if volume.path is None:
        raise StorageError(f"volume {volume.name!r} of pool {volume.pool!r} is not a local "
                           "file; its backend gives the drive's medium", where=f"disk[{index}]")
    return Drive(
        id=f"disk{index}",
        medium=FileMedium(path=str(volume.path), format=volume.format),
        kind=disk.kind,
        bus=Bus(disk.bus_type),
        read_only=disk.read_only or disk.kind == "cdrom",
        boot_index=1 if disk.primary else None,
        serial=disk.devname,
    )
