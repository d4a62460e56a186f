"""The virt task's disk blocks: every field of nomad-driver-virt's disk, and their errors."""

from __future__ import annotations

import pytest

from vmdriver.errors import SpecError
from vmdriver.hclfile import loads
from vmdriver.storage import DiskRequest, parse_disks
from vmdriver.storage.directory import DirectoryPool


def disks(text: str) -> tuple[DiskRequest, ...]:
    return parse_disks(loads(text, "job.hcl")["disk"], "disk")


def error(text: str) -> str:
    with pytest.raises(SpecError) as info:
        disks(text)
    return str(info.value)


def test_every_field() -> None:
    (d,) = disks("""
disk {
  size = "10GiB"
  sparse = false
  format = "raw"
  bus_type = "scsi"
  devname = "data-disk"
  kind = "disk"
  read_only = true
  pool = "local"
  primary = true
  chained = false
  driver = "qemu"
  source {
    image = "local/focal.img"
    format = "qcow2"
  }
}""")
    assert d.model_dump() == {
        "size": 10 << 30, "sparse": False, "format": "raw", "bus_type": "scsi",
        "devname": "data-disk", "kind": "disk", "read_only": True, "pool": "local",
        "primary": True, "chained": False, "driver": "qemu",
        "source": {"image": "local/focal.img", "volume": None, "format": "qcow2"},
        "volume": None,
    }


def test_sizes_bytes_decimal_and_binary() -> None:
    got = disks('disk {\n size = 1048576\n primary = true\n}\n'
                'disk { size = "20GB" }\ndisk { size = "15GiB" }')
    assert [d.size for d in got] == [1 << 20, 20 * 10**9, 15 << 30]


def test_single_disk_is_primary_and_devnames_are_assigned() -> None:
    (d,) = disks('disk { size = "1GiB" }')
    assert d.primary and d.devname == "vda"
    got = disks('disk {\n size = "1GiB"\n bus_type = "scsi"\n}\n'
                'disk {\n kind = "cdrom"\n source { image = "x.iso" }\n}')
    assert [(d.primary, d.devname, d.bus_type, d.read_only) for d in got] == [
        (True, "sda", "scsi", False), (False, "sdb", "ide", True)]


def test_devnames_beyond_z() -> None:
    text = 'disk {\n size = 1\n primary = true\n}\n' + 'disk { size = 1 }\n' * 27
    assert [d.devname for d in disks(text)][25:] == ["vdz", "vdaa", "vdab"]


@pytest.mark.parametrize(("text", "expected"), [
    ('disk { size = "1GiB" }\ndisk { size = "1GiB" }',
     "disk: no primary disk defined (allowed: primary = true on exactly one disk)"),
    ('disk {\n size = 1\n primary = true\n}\ndisk {\n size = 1\n primary = true\n}',
     "disk[0].primary, disk[1].primary: more than one primary disk"),
    ('disk { size = "10 parsecs" }', "disk[0].size: not a size (got '10 parsecs'"),
    ('disk { size = 0 }', "disk[0].size: size must be more than 0 bytes"),
    ('disk { sparse = "yes" }', "disk[0].sparse: input should be a valid boolean"),
    ('disk {\n size = 1\n format = "vmdk"\n}', "disk[0].format: value not allowed (got 'vmdk'"),
    ('disk {\n size = 1\n bus_type = "nvme"\n}', "disk[0].bus_type: value not allowed"),
    ('disk {\n size = 1\n kind = "lun"\n}', "disk[0].kind: value not allowed"),
    ('disk {\n size = 1\n devname = "a/b"\n}', "disk[0].devname: expected 1-20 letters"),
    ('disk {\n size = 1\n colour = "red"\n}', "disk[0].colour: unknown field"),
    ('disk { chained = true }', "disk[0].chained: chained cannot be enabled without a source"),
    ('disk {\n chained = true\n sparse = false\n source { image = "a" }\n}',
     "disk[0].sparse: a chained disk is thin"),
    ('disk { source {\n image = "a"\n volume = "b"\n} }',
     "disk[0].source: disk source must not define both"),
    ('disk { source { format = "qcow2" } }', "disk[0].source: disk source must define an image"),
    ('disk { source {\n image = "a"\n format = "iso"\n} }',
     "disk[0].source.format: unsupported image format 'iso'"),
    ('disk { primary = true }', "disk[0].size: an empty disk needs a size"),
    ('disk {\n size = 1\n primary = true\n}\ndisk { kind = "cdrom" }',
     "disk[1].source: a cdrom needs a source"),
    ('disk {\n kind = "cdrom"\n read_only = false\n source { image = "a" }\n}',
     "disk[0].read_only: a cdrom is always read-only"),
    ('disk {\n kind = "cdrom"\n bus_type = "virtio"\n source { image = "a" }\n}',
     "disk[0].bus_type: a cdrom needs an ide, sata or scsi bus"),
    ('disk {\n size = 1\n devname = "x"\n primary = true\n}\ndisk {\n size = 1\n devname = "x"\n}',
     "disk[1].devname: devname already used by another disk"),
    ('disk {\n volume = "/dev/vdb"\n size = 1\n}',
     "disk[0].size: size cannot be set when using a Nomad volume"),
    ('disk { volume = "/etc/passwd" }', "disk[0].volume: expected the destination of a block"),
    ('disk {\n size = 1\n driver = "xen"\n}', "disk[0].driver: value not allowed"),
    ('disk {\n size = 1\n read_only = true\n bus_type = "sata"\n}',
     "disk[0].bus_type: an IDE/SATA disk cannot be read-only in QEMU (got 'sata'"),
])
def test_errors_name_disk_and_field(text: str, expected: str) -> None:
    assert error(text).startswith(expected)


def test_chained_raw_is_the_pools_to_refuse(pool: DirectoryPool) -> None:
    # A ceph pool's chained disk is a raw RBD clone: the parser leaves format to the pool.
    (d,) = disks('disk {\n chained = true\n format = "raw"\n source { image = "a" }\n}')
    assert d.chained and d.format == "raw"
    (default,) = disks('disk {\n chained = true\n source { image = "a" }\n}')
    assert default.format is None
    with pytest.raises(SpecError) as info:
        pool.volume_request(d.model_copy(update={"source": None}), alloc_id="00000000",
                            task="t", index=0)
    assert str(info.value).startswith("disk[0].format: a chained disk in a directory pool is a "
                                      "qcow2 overlay (got 'raw'")
    req = pool.volume_request(default.model_copy(update={"source": None}), alloc_id="00000000",
                              task="t", index=0)
    assert req.format == "qcow2" and req.chained
