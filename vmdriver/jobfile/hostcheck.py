"""The host config's sections that belong to higher layers, checked when a face loads it.

:class:`~vmdriver.host.config.HostConfig` keeps ``storage_pools`` and ``network``
raw (the host layer sits below storage and networking); every face calls
:func:`check_host` right after loading, so a typo there is one error line at
start-up, not a failure when the first task needs a pool.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmdriver.host.config import HostConfig
from vmdriver.network.config import NetworkSettings
from vmdriver.runtime.netconfig import network_settings
from vmdriver.storage import StoragePools, default_storage_pools, parse_storage_pools


@dataclass(frozen=True)
class HostSections:
    """The parsed sections."""

    storage: StoragePools
    network: NetworkSettings


def check_host(host: HostConfig, where: str = "host config") -> HostSections:
    """Parse and check every raw section; HostConfigError names the field at fault."""
    storage = (parse_storage_pools(host.storage_pools, f"{where}: storage_pools")
               if host.storage_pools is not None else default_storage_pools(host.state_dir))
    return HostSections(storage, network_settings(host))
