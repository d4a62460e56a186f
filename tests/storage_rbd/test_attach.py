"""RBD volumes as the spec's drives, and chained disks a ceph pool accepts (no cluster needed)."""

from __future__ import annotations

from vmdriver.hclfile import loads
from vmdriver.spec import Bus, RbdMedium
from vmdriver.storage import parse_disks
from vmdriver.storage.attach import drive_for
from vmdriver.storage.base import Volume
from vmdriver.storage.config import CephPoolConfig
from vmdriver.storage.rbd import RbdPool

KEY = "AQCzNMxpb6aWIxAA7YrNMSg8z5TxEvB0jsuibQ=="


def pool() -> RbdPool:
    return RbdPool(CephPoolConfig(name="remote", pool="vmd", hosts=("10.0.0.2:3300", "[fd00::2]"),
                                  authentication={"username": "nomad", "secret": KEY}))


def test_drive_for_an_rbd_volume_names_the_pool_never_the_key() -> None:
    p = pool()
    disks = parse_disks(loads('disk {\n chained = true\n source { image = "x" }\n'
                              ' devname = "root"\n primary = true\n}\ndisk {\n size = "1GiB"\n'
                              ' read_only = true\n bus_type = "scsi"\n}', "job.hcl")["disk"])
    vols = [Volume(pool="remote", name=f"0a1b2c3d-web-{i}", format="raw", size=1 << 30,
                   path=None, protocol=p.protocol(f"0a1b2c3d-web-{i}")) for i in range(2)]
    root, data = (drive_for(d, v, i) for i, (d, v) in enumerate(zip(disks, vols, strict=True)))
    assert root.medium == p.medium("0a1b2c3d-web-0") == RbdMedium(
        pool="vmd", image="0a1b2c3d-web-0", monitors=("10.0.0.2:3300", "[fd00::2]:3300"),
        user="nomad", secret_ref="remote")
    assert (root.id, root.boot_index, root.serial, root.read_only) == ("disk0", 1, "root", False)
    assert (data.bus, data.read_only, data.boot_index) == (Bus.SCSI, True, None)
    assert KEY not in root.model_dump_json() + data.model_dump_json()


def test_a_chained_disk_in_a_ceph_pool_is_raw() -> None:
    for text in ('disk {\n chained = true\n source { image = "x" }\n}',
                 'disk {\n chained = true\n format = "raw"\n source { image = "x" }\n}'):
        (disk,) = parse_disks(loads(text, "job.hcl")["disk"])
        req = pool().volume_request(disk.model_copy(update={"source": None}),
                                    alloc_id="0a1b2c3d", task="web", index=0)
        assert (req.format, req.chained, req.sparse) == ("raw", True, True)
