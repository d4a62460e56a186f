"""cloud-init for vmdriver's guests: a NoCloud seed built in-process from a task.

A face maps its task into a :class:`SeedRequest` (values only; the password is
already a SHA-512 crypt hash from :func:`hash_password`) and calls
:func:`build_seed`. The core attaches the seed (ISO as a CD-ROM, FAT as a disk)
and the task dirs as virtio-9p/virtiofs devices whose mount tags are
:data:`TAG_LOCAL`, :data:`TAG_ALLOC` and :data:`TAG_SECRETS`. See docs/cloud-init.md.
"""

from vmdriver.cloudinit.files import read_task_file
from vmdriver.cloudinit.mappings import mapping_seed_files
from vmdriver.cloudinit.password import hash_password, verify_password
from vmdriver.cloudinit.request import (
    GUEST_DIRS,
    TAG_ALLOC,
    TAG_LOCAL,
    TAG_SECRETS,
    SeedRequest,
    Share,
    ShareFs,
    default_hostname,
    default_instance_id,
    guest_env,
    split_keys,
    task_shares,
)
from vmdriver.cloudinit.seed import SeedFormat, build_seed, seed_files, seed_texts
from vmdriver.cloudinit.userdata import ENV_FILE, PROFILE_SCRIPT

__all__ = [
    "ENV_FILE",
    "GUEST_DIRS",
    "PROFILE_SCRIPT",
    "TAG_ALLOC",
    "TAG_LOCAL",
    "TAG_SECRETS",
    "SeedFormat",
    "SeedRequest",
    "Share",
    "ShareFs",
    "build_seed",
    "default_hostname",
    "default_instance_id",
    "guest_env",
    "hash_password",
    "mapping_seed_files",
    "read_task_file",
    "seed_files",
    "seed_texts",
    "split_keys",
    "task_shares",
    "verify_password",
]
