"""From the core's spec (``TapNic``/``MacvtapNic``, ``PortForward``) to this package's requests."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from vmdriver.network.manager import NicRequest
from vmdriver.network.nft import PortMap
from vmdriver.spec import MacvtapNic, TapNic
from vmdriver.spec.devices import Nic, PortForward


def nic_requests(nics: Sequence[Nic]) -> list[NicRequest]:
    """The tap and macvtap NICs of a spec, indexed by their position among all NICs."""
    out = []
    for index, nic in enumerate(nics):
        if isinstance(nic, TapNic):
            out.append(NicRequest(index, "tap", id=nic.id, bridge=nic.bridge, mac=nic.mac or ""))
        elif isinstance(nic, MacvtapNic):
            out.append(NicRequest(index, "macvtap", id=nic.id, device=nic.device, mode=nic.mode,
                                  mac=nic.mac or ""))
    return out


def port_maps(forwards: Sequence[PortForward]) -> list[PortMap]:
    """Published ports, each bound to its host address if the forward names one."""
    return [PortMap(f.host_port, f.guest_port, tuple(sorted(f.protocols)),
                    ipaddress.ip_address(f.host_ip) if f.host_ip else None) for f in forwards]
