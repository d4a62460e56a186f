"""Storage pools and volumes for VM disks (nomad-driver-virt's ``storage_pools`` and ``disk``).

What a face uses::

    pools = Pools(parse_storage_pools(raw, where))        # host config
    disks = parse_disks(task_config.get("disk"), "disk")  # task config
    pools.check(disks)                                    # before anything is made
    vols = pools.create_task_volumes(alloc_id, task, disks, images)
    ...
    pools.remove_task_volumes(alloc_id, task)             # DestroyTask

See docs/storage.md.
"""

from vmdriver.storage.base import Pool, SourceImage, Volume, VolumeRequest, volume_name
from vmdriver.storage.config import (
    CephPoolConfig,
    DirectoryPoolConfig,
    StoragePools,
    default_storage_pools,
    parse_storage_pools,
    validate_storage_pools,
)
from vmdriver.storage.disks import DiskRequest, DiskSource, parse_disks
from vmdriver.storage.errors import StorageError, StorageFull, StorageUnavailable
from vmdriver.storage.pools import Pools, open_pool

__all__ = [
    "CephPoolConfig",
    "DirectoryPoolConfig",
    "DiskRequest",
    "DiskSource",
    "Pool",
    "Pools",
    "SourceImage",
    "StorageError",
    "StorageFull",
    "StoragePools",
    "StorageUnavailable",
    "Volume",
    "VolumeRequest",
    "default_storage_pools",
    "open_pool",
    "parse_disks",
    "parse_storage_pools",
    "validate_storage_pools",
    "volume_name",
]
