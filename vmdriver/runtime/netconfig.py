"""The host config's network sections as the network layer's settings (no netlink imported).

Also what faces read without loading the network layer: how long a face waits
for a guest's address, and the addresses a supervisor found (written into the
VM's runtime dir, read by `vmdriver ps` from another process).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vmdriver.host.config import HostConfig
from vmdriver.network.config import NetworkSettings, network_settings_from_mapping
from vmdriver.units import parse_duration

#: In a VM's runtime dir: ``{"addresses": [...], "source": "agent"}``.
ADDRESSES_FILE = "addresses.json"


def network_settings(host: HostConfig) -> NetworkSettings:
    """The host config's network sections as the network layer's settings."""
    data: dict[str, Any] = {"allowed_bridges": list(host.allowed_bridges),
                            "allowed_devices": list(host.allowed_devices)}
    if host.network:
        data["network"] = host.network
    return network_settings_from_mapping(data, "host config")


def address_wait(host: HostConfig) -> float:
    """The host config's ``address_wait`` in seconds (default 30 s)."""
    return parse_duration(host.address_wait, where="host config: address_wait")


def saved_addresses(runtime_dir: Path) -> tuple[str, ...]:
    """The guest addresses a supervisor found for the VM with this runtime dir."""
    try:
        data = json.loads((runtime_dir / ADDRESSES_FILE).read_text())
        return tuple(str(a) for a in data["addresses"])
    except (OSError, ValueError, KeyError, TypeError):
        return ()
