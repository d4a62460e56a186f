"""The host config's network sections as the network layer's settings (no netlink imported)."""

from __future__ import annotations

from typing import Any

from vmdriver.host.config import HostConfig
from vmdriver.network.config import NetworkSettings, network_settings_from_mapping


def network_settings(host: HostConfig) -> NetworkSettings:
    """The host config's network sections as the network layer's settings."""
    data: dict[str, Any] = {"allowed_bridges": list(host.allowed_bridges),
                            "allowed_devices": list(host.allowed_devices)}
    if host.network:
        data["network"] = host.network
    return network_settings_from_mapping(data, "host config")
