"""Names of everything vmdriver creates on the host, derived from the VM id.

Deterministic names make teardown and crash recovery need no saved state:
given the ids of the VMs that still exist, :func:`vm_key` tells which taps and
chains are theirs, and every other ``vmd``-prefixed link or ``vm-`` chain is an
orphan. Interface names are at most 15 bytes, so the VM id is hashed.
"""

from __future__ import annotations

import hashlib
import re

#: Prefix of tap links (``vmd`` + 10 hex of the VM key + NIC index in hex): 14 bytes.
TAP_PREFIX = "vmd"
#: Prefix of macvtap links.
MACVTAP_PREFIX = "vmm"
#: The nftables table (families ``inet``, ``bridge``, ``netdev``) vmdriver owns.
TABLE = "vmdriver"
#: Managed networks' chains: ``net-<name>-<hook>``.
NET_CHAIN_PREFIX = "net-"
#: Per-VM chains: ``vm-<key>-<hook>``.
VM_CHAIN_PREFIX = "vm-"
KEY_LEN = 10
MAX_NICS = 16
_LINK_RE = re.compile(rf"^(?:{TAP_PREFIX}|{MACVTAP_PREFIX})([0-9a-f]{{{KEY_LEN}}})[0-9a-f]$")
_CHAIN_RE = re.compile(rf"^{VM_CHAIN_PREFIX}([0-9a-f]{{{KEY_LEN}}})-[a-z0-9]+$")


def vm_key(vm_id: str) -> str:
    """10 hex digits naming a VM's host objects (40 bits: collisions are negligible)."""
    return hashlib.sha256(vm_id.encode()).hexdigest()[:KEY_LEN]


def _check_index(index: int) -> None:
    if not 0 <= index < MAX_NICS:
        raise ValueError(f"NIC index {index} out of range 0-{MAX_NICS - 1}")


def tap_name(vm_id: str, index: int) -> str:
    """The tap link of NIC ``index`` of a VM, e.g. ``vmd3f2a9c01b70``."""
    _check_index(index)
    return f"{TAP_PREFIX}{vm_key(vm_id)}{index:x}"


def macvtap_name(vm_id: str, index: int) -> str:
    """The macvtap link of NIC ``index`` of a VM."""
    _check_index(index)
    return f"{MACVTAP_PREFIX}{vm_key(vm_id)}{index:x}"


def link_key(ifname: str) -> str | None:
    """The VM key of a vmdriver tap/macvtap link name, or None if it is not one."""
    m = _LINK_RE.match(ifname)
    return m.group(1) if m else None


def vm_chain(vm_id: str, hook: str) -> str:
    """A per-VM chain, e.g. ``vm-3f2a9c01b7-dnat``."""
    return f"{VM_CHAIN_PREFIX}{vm_key(vm_id)}-{hook}"


def chain_key(chain: str) -> str | None:
    """The VM key of a per-VM chain name, or None if it is not one."""
    m = _CHAIN_RE.match(chain)
    return m.group(1) if m else None


def net_chain(network: str, hook: str) -> str:
    """A managed network's chain, e.g. ``net-default-nat``."""
    return f"{NET_CHAIN_PREFIX}{network}-{hook}"


def default_mac(vm_id: str, index: int) -> str:
    """A stable MAC in QEMU's locally administered 52:54:00 range, from the VM id and NIC."""
    _check_index(index)
    digest = hashlib.sha256(f"{vm_id}\0{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def bridge_mac(bridge: str) -> str:
    """A fixed MAC for a managed bridge (else it takes its lowest port's and changes)."""
    digest = hashlib.sha256(f"bridge\0{bridge}".encode()).digest()
    # 0x52 = locally administered, unicast; second byte distinguishes from guests' 52:54:00.
    return "52:56:" + ":".join(f"{b:02x}" for b in digest[:4])
