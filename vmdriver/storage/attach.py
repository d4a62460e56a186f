"""A created volume as the spec's :class:`~vmdriver.spec.Drive`: what the virt face hands the core.

Directory volumes become a :class:`~vmdriver.spec.FileMedium` with the format
always given. The runtime opens drives through the path policy, so the face
allows each directory pool's root (:meth:`vmdriver.storage.pools.Pools.local_roots`)
as an image path (the volumes) and as a backing dir (bases, golden volumes).

Ceph volumes become an :class:`~vmdriver.spec.RbdMedium` naming the pool (its
``secret_ref``), never the key: the runtime reads the key from the host config's
pool of that name and hands it to QEMU in a 0600 file.
"""

from __future__ import annotations

from vmdriver.spec import Bus, Drive, FileMedium, RbdMedium
from vmdriver.storage.base import Volume
from vmdriver.storage.disks import DiskRequest
from vmdriver.storage.errors import StorageError
from vmdriver.storage.rbd import volume_medium  # the Ceph bindings load only when used


def drive_for(disk: DiskRequest, volume: Volume, index: int) -> Drive:
    """The drive for disk ``index``: the primary boots first, ``devname`` is its serial."""
    return Drive(
        id=f"disk{index}",
        medium=medium_for(volume, index),
        kind=disk.kind,
        bus=Bus(disk.bus_type),
        read_only=disk.read_only or disk.kind == "cdrom",
        boot_index=1 if disk.primary else None,
        serial=disk.devname,
    )


def medium_for(volume: Volume, index: int) -> FileMedium | RbdMedium:
    """Where the drive's data is: the volume's file, or its RBD image."""
    if volume.path is not None:
        return FileMedium(path=str(volume.path), format=volume.format)
    if volume.protocol.get("driver") == "rbd":
        return volume_medium(volume.pool, volume.protocol)
    raise StorageError(f"volume {volume.name!r} of pool {volume.pool!r} is neither a local "
                       "file nor an RBD image", where=f"disk[{index}]")
