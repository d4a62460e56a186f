"""Host-side networking of VMs: taps on bridges, macvtap, published ports, managed networks.

Sits below :mod:`vmdriver.runtime` (which calls it while starting and stopping
a VM) and above :mod:`vmdriver.host`. Netlink through pyroute2, nftables
through libnftables' JSON API, DHCP/DNS through a dnsmasq process the caller
owns: no ``ip``/``nft`` processes, no libvirt, no ``qemu-bridge-helper``.
See docs/networking.md.
"""

from vmdriver.network.config import ManagedNetwork, NetworkSettings, check_nic, network_settings_from_mapping
from vmdriver.network.discovery import GuestAddresses, discover
from vmdriver.network.manager import HostNetwork, NicRequest, Reconciled, VmNetwork
from vmdriver.network.nft import Guard, PortMap
from vmdriver.network.tap import Tap, vhost_net_status

__all__ = [
    "Guard",
    "GuestAddresses",
    "HostNetwork",
    "ManagedNetwork",
    "NetworkSettings",
    "NicRequest",
    "PortMap",
    "Reconciled",
    "Tap",
    "VmNetwork",
    "check_nic",
    "discover",
    "network_settings_from_mapping",
    "vhost_net_status",
]
