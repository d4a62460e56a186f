"""The fingerprint's node attributes in the names of the driver the plugin stands in for.

Installed as ``qemu``, the plugin publishes what Nomad's qemu driver does
(:mod:`vmdriver.host.fingerprint`). Installed as ``virt``, job constraints were
written against HashiCorp's nomad-driver-virt, which publishes libvirt's view
of the host: the emulator version as libvirt encodes it, running and defined
domains, networks and storage pools. Here the same names are built from
vmdriver's own state: the host config's managed networks, allowed bridges and
storage pools, and the plugin's task table. ``driver.virt.libvirt.version`` is
never published: there is no libvirt, so a constraint on it must not match.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from vmdriver.host.emulators import Emulator
from vmdriver.host.fingerprint import Fingerprint
from vmdriver.jobfile.hostcheck import HostSections
from vmdriver.network.config import NetworkSettings
from vmdriver.nomad.proto import structs_pb2
from vmdriver.storage import StoragePools

#: An attribute value; Nomad compares ints as numbers (``>=`` on a version).
Value = str | bool | int
VIRT = "driver.virt"
#: What a pool's ``.provider`` says (nomad-driver-virt's says ``libvirt``).
POOL_PROVIDER = "vmdriver"
SYS_CLASS_NET = Path("/sys/class/net")
_VERSION_RE = re.compile(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def to_proto(attrs: Mapping[str, Value]) -> dict[str, structs_pb2.Attribute]:
    """Nomad's Attribute messages, each value in its own typed field."""
    out = {}
    for key, value in attrs.items():
        attr = structs_pb2.Attribute()
        # bool first: Python's bool is an int, Nomad's is not (a constraint on
        # ``true`` would not match 1).
        if isinstance(value, bool):
            attr.bool_val = value
        elif isinstance(value, int):
            attr.int_val = value
        else:
            attr.string_val = str(value)
        out[key] = attr
    return out


def libvirt_version(text: str) -> int | None:
    """``8.2.2`` as libvirt encodes versions (major * 1000000 + minor * 1000 + micro).

    Missing parts are 0 and anything after the third is ignored, as libvirt's
    parser does; a minor or micro above 999 would not encode, so it is None.
    """
    m = _VERSION_RE.match(text.strip())
    if m is None:
        return None
    major, minor, micro = (int(p or 0) for p in m.groups())
    if minor > 999 or micro > 999:
        return None
    return major * 1_000_000 + minor * 1_000 + micro


def host_emulator_version(emulators: Sequence[Emulator]) -> str | None:
    """The version of the host architecture's emulator (libvirt's hypervisor version),
    else of the first one with a version."""
    versions = {e.arch: e.version for e in emulators if e.version}
    return versions.get(platform.machine()) or next(iter(versions.values()), None)


def link_exists(name: str) -> bool:
    """True if a network link of that name exists in this network namespace."""
    return "/" not in name and (SYS_CLASS_NET / name).exists()


def network_attributes(settings: NetworkSettings,
                       exists: Callable[[str], bool] = link_exists) -> dict[str, Value]:
    """``driver.virt.network.<name>.state`` and ``.bridge_name``.

    A managed network is ``active`` even before its bridge exists: vmdriver makes
    the bridge when the first VM on it starts, so (unlike a stopped libvirt
    network) a VM can use it now, and a job constrained to an active network must
    be placeable on a node that has not made it yet. A listed host bridge has no
    network name of its own: it is published under the bridge's name, ``active``
    only while the link exists (vmdriver never creates it).
    """
    out: dict[str, Value] = {}
    for net in settings.networks.values():
        out |= _network(net.name, net.bridge, "active")
    managed = {net.bridge for net in settings.networks.values()}
    for bridge in settings.allowed_bridges:
        if bridge in managed or bridge in settings.networks:
            continue  # already published; a managed network's name wins a clash
        out |= _network(bridge, bridge, "active" if exists(bridge) else "inactive")
    return out


def _network(name: str, bridge: str, state: str) -> dict[str, Value]:
    prefix = f"{VIRT}.network.{name}"
    return {f"{prefix}.state": state, f"{prefix}.bridge_name": bridge}


def pool_attributes(pools: StoragePools) -> dict[str, Value]:
    """``driver.virt.storage_pool.<name>`` (its kind), ``.default`` and ``.provider``."""
    out: dict[str, Value] = {}
    for pool in pools.pools:
        prefix = f"{VIRT}.storage_pool.{pool.name}"
        out[prefix] = pool.kind
        out[f"{prefix}.default"] = pool.name == pools.default
        out[f"{prefix}.provider"] = POOL_PROVIDER
    return out


def virt_attributes(fp: Fingerprint, sections: HostSections, running: int, exited: int,
                    exists: Callable[[str], bool] = link_exists) -> dict[str, Value]:
    """Every ``driver.virt.*`` attribute; none where no emulator was found (as for qemu)."""
    if not fp.healthy:
        return {}
    attrs: dict[str, Value] = {VIRT: True}
    text = host_emulator_version(fp.emulators)
    version = libvirt_version(text) if text else None
    if version is not None:
        attrs[f"{VIRT}.emulator.version"] = version
    attrs[f"{VIRT}.emulators"] = ",".join(e.arch for e in fp.emulators)
    attrs[f"{VIRT}.active"] = running
    attrs[f"{VIRT}.inactive"] = exited
    attrs |= {f"{VIRT}.{key}": value for key, value in fp.facts.items()}
    attrs |= network_attributes(sections.network, exists)
    attrs |= pool_attributes(sections.storage)
    return attrs
