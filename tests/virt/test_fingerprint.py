"""Fingerprint over gRPC: installed as ``virt`` the plugin publishes nomad-driver-virt's
attributes (built from vmdriver's state), installed as ``qemu`` the qemu driver's. No guest boots.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import short_tmp
from tests.nomad.nomadsim import Plugin, install_launcher, stream_first
from vmdriver.nomad.proto import driver_pb2 as pb
from vmdriver.nomad.proto import structs_pb2

MISSING = "vmdnosuch0"  # a listed bridge no host has: "inactive"


@pytest.fixture
def place() -> Iterator[Path]:
    with short_tmp("vfp-") as path:
        yield path


def host_config(place: Path) -> dict[str, Any]:
    """Two directory pools (the second the default), a managed network, listed bridges."""
    return {
        "state_dir": str(place / "state"),
        "storage_pools": {"default": "spare", "ceph": {}, "directory": {
            "local": {"path": str(place / "pool")}, "spare": {"path": str(place / "spare")}}},
        "network": {"default": {"bridge": "vmdfpbr0", "subnet": "192.168.251.0/24"}},
        "allowed_bridges": ["lo", MISSING],
    }


def first_fingerprint(place: Path, name: str) -> pb.FingerprintResponse:
    """The first Fingerprint answer of the plugin installed as ``name``."""
    plugin = Plugin([str(install_launcher(place / name, name))])
    try:
        plugin.configure(host_config(place))
        fp: pb.FingerprintResponse = stream_first(
            plugin.driver.Fingerprint(pb.FingerprintRequest()), 60)
    finally:
        plugin.close()
    assert fp.health == pb.FingerprintResponse.HEALTHY, fp.health_description
    return fp


def typed_value(attr: structs_pb2.Attribute) -> object:
    """Whichever value field the attribute has set."""
    return getattr(attr, attr.WhichOneof("value") or "unset")


def encoded_qemu_version() -> int:
    """This host's QEMU version as libvirt encodes it, read independently of vmdriver."""
    out = subprocess.run(("qemu-system-x86_64", "--version"), capture_output=True, text=True,
                         check=True, timeout=10).stdout
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    assert m, out
    major, minor, micro = map(int, m.groups())
    return major * 1_000_000 + minor * 1_000 + micro


def test_plugin_named_virt_publishes_the_virt_drivers_attributes(place: Path) -> None:
    attrs = first_fingerprint(place, "virt").attributes
    assert attrs["driver.virt"].bool_val is True
    version = attrs["driver.virt.emulator.version"]
    assert version.WhichOneof("value") == "int_val"  # `>=` constraints compare numbers
    assert version.int_val == encoded_qemu_version()
    assert (attrs["driver.virt.active"].int_val, attrs["driver.virt.inactive"].int_val) == (0, 0)
    assert attrs["driver.virt.active"].WhichOneof("value") == "int_val"
    assert "driver.virt.libvirt.version" not in attrs  # there is no libvirt
    pools = {k: v for k, v in attrs.items() if k.startswith("driver.virt.storage_pool.")}
    assert {k: typed_value(v) for k, v in pools.items()} == {
        "driver.virt.storage_pool.local": "directory",
        "driver.virt.storage_pool.local.default": False,
        "driver.virt.storage_pool.local.provider": "vmdriver",
        "driver.virt.storage_pool.spare": "directory",
        "driver.virt.storage_pool.spare.default": True,
        "driver.virt.storage_pool.spare.provider": "vmdriver",
    }
    net = {k: v.string_val for k, v in attrs.items() if k.startswith("driver.virt.network.")}
    assert net == {
        "driver.virt.network.default.state": "active",  # made when its first VM starts
        "driver.virt.network.default.bridge_name": "vmdfpbr0",
        "driver.virt.network.lo.state": "active",
        "driver.virt.network.lo.bridge_name": "lo",
        f"driver.virt.network.{MISSING}.state": "inactive",
        f"driver.virt.network.{MISSING}.bridge_name": MISSING,
    }
    # vmdriver's own facts under the virt prefix; nothing in the qemu driver's names.
    assert attrs["driver.virt.kvm"].WhichOneof("value") == "bool_val"
    assert attrs["driver.virt.jail.mode"].string_val in ("userns", "setuid", "none")
    assert not [k for k in attrs if not k.startswith("driver.virt")]


def test_plugin_named_qemu_keeps_the_qemu_drivers_attributes(place: Path) -> None:
    attrs = first_fingerprint(place, "qemu").attributes
    assert attrs["driver.qemu"].bool_val is True
    assert re.fullmatch(r"\d+\.\d+\.\d+", attrs["driver.qemu.version"].string_val)
    assert "x86_64" in attrs["driver.qemu.emulators"].string_val.split(",")
    assert attrs["driver.qemu.kvm"].WhichOneof("value") == "bool_val"
    assert not [k for k in attrs if not k.startswith("driver.qemu")]
