"""Fixtures: namespaces, a host config, and what vmdriver left behind in a namespace.

Everything runs inside network namespaces these fixtures create; the
supervisor under test runs in a process inside one of them
(:mod:`tests.netvm.server`), so its taps, bridges, nftables tables and dnsmasq
live and die with the namespace.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import psutil

from tests.network import netns
from vmdriver.host.config import HostConfig
from vmdriver.network import names, nft
from vmdriver.network.dnsmasq import running_pid
from vmdriver.network.tap import vmdriver_links

BRIDGE = "vmdbr0"
SUBNET = "10.213.0.0/24"


def host_config(state: Path, guest: Path | None = None, ipv6: str = "", **extra: Any
                ) -> dict[str, Any]:
    """A host config (as the server takes it) with the managed network ``default``."""
    net = {"bridge": BRIDGE, "subnet": SUBNET, **({"ipv6_subnet": ipv6} if ipv6 else {})}
    cfg: dict[str, Any] = {
        "state_dir": str(state),
        "image_paths": [str(guest)] if guest else [],
        "network": {"default": net},
        **extra,
    }
    if "jail" in HostConfig.model_fields:
        cfg["jail"] = "off"  # not what these tests are about
    if guest is not None:
        cfg["guest"] = str(guest)
    return cfg


def state_tmp() -> Path:
    """A short state dir (unix socket paths are limited to 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="vmdv-", dir="/tmp"))


def cleanup(namespaces: list[str], state: Path) -> None:
    for ns in namespaces:
        netns.remove(ns)
    shutil.rmtree(state, ignore_errors=True)


def links_of(ns: str, vm_id: str) -> list[str]:
    """vmdriver's tap/macvtap links of a VM in ``ns``."""
    with netns.inside(ns):
        return [n for n, key in vmdriver_links().items() if key == names.vm_key(vm_id)]


def chains_of(ns: str, vm_id: str) -> list[str]:
    """The VM's nftables chains in ``ns``."""
    prefix = f"{names.VM_CHAIN_PREFIX}{names.vm_key(vm_id)}-"
    with netns.inside(ns):
        return [name for _, name in nft.chains() if name.startswith(prefix)]


def dnsmasq_pid(state: Path, network: str = "default") -> int | None:
    """The managed network's dnsmasq, if one runs (pid file + command line agree)."""
    return running_pid(state / "net", network)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def qemus_in(ns: str) -> list[int]:
    """QEMU processes running in the namespace."""
    return [p for p in netns.pids(ns) if "qemu-system" in " ".join(_cmdline(p))]


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []
