"""The operator's network settings: managed networks and which host links jobs may use.

In the host config (HCL)::

    network "default" {
      bridge      = "vmdbr0"
      subnet      = "192.168.122.0/24"
      dhcp        = true
      nat         = true
      ipv6_subnet = "fd00:122::/64"     # optional: router advertisements, SLAAC
    }
    allowed_bridges = ["virbr0", "br-lan"]   # besides the managed networks' bridges
    allowed_devices = ["eth1"]               # host devices macvtap NICs may sit on

A job may attach to a managed network's bridge and to the bridges and devices
listed; anything else is refused before launch (:func:`check_nic`). Empty lists
mean "managed networks only": a job cannot put a VM on an arbitrary host bridge
unless the operator said so.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from vmdriver.errors import HostConfigError, PolicyError

#: A Linux interface name: at most 15 bytes, no slash, colon or whitespace.
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$", re.ASCII)
_NETNAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$", re.ASCII)
#: libvirt's default bridge: a job naming it on a host that has it uses it as is.
LIBVIRT_BRIDGE = "virbr0"


def _ifname(value: Any, what: str) -> str:
    if not isinstance(value, str) or not IFNAME_RE.match(value):
        raise ValueError(f"{what} must be an interface name of 1-15 letters, digits, '_', '.', '-'")
    return value


class ManagedNetwork(BaseModel):
    """A bridge vmdriver creates, with a gateway address, DHCP/DNS (dnsmasq) and NAT."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    #: Serve DHCP (and DNS) with dnsmasq on the bridge.
    dhcp: StrictBool = True
    #: Masquerade traffic from the subnet leaving through other interfaces.
    nat: StrictBool = True
    #: An IPv6 /64: the bridge gets its first address, dnsmasq sends router
    #: advertisements so guests configure themselves (SLAAC), and it is masqueraded too.
    ipv6_subnet: ipaddress.IPv6Network | None = None
    #: Serve DNS on the gateway address (forwarding to the host's resolvers); false
    #: runs dnsmasq for DHCP only.
    dns: StrictBool = True
    #: Domain dnsmasq hands out and answers for; empty for none.
    domain: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NETNAME_RE.match(value):
            raise ValueError("network names are 1-32 letters, digits, '_' or '-'")
        return value

    @field_validator("bridge", mode="before")
    @classmethod
    def _bridge(cls, value: Any) -> str:
        return _ifname(value, "bridge")

    @field_validator("subnet", mode="before")
    @classmethod
    def _subnet(cls, value: Any) -> ipaddress.IPv4Network:
        net = ipaddress.IPv4Network(str(value), strict=True)
        if net.prefixlen > 29:
            raise ValueError("subnet needs room for a gateway and guests: /29 or larger")
        return net

    @field_validator("ipv6_subnet", mode="before")
    @classmethod
    def _subnet6(cls, value: Any) -> ipaddress.IPv6Network | None:
        if value is None or value == "":
            return None
        net = ipaddress.IPv6Network(str(value), strict=True)
        if net.prefixlen != 64:
            raise ValueError("ipv6_subnet must be a /64 (SLAAC needs one)")
        return net

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        if value and not re.match(r"^[A-Za-z0-9.-]{1,253}$", value):
            raise ValueError("domain must be a DNS name")
        return value

    @property
    def gateway(self) -> ipaddress.IPv4Interface:
        """The bridge's address: the subnet's first host."""
        return ipaddress.IPv4Interface(f"{self.subnet.network_address + 1}/{self.subnet.prefixlen}")

    @property
    def gateway6(self) -> ipaddress.IPv6Interface | None:
        """The bridge's IPv6 address (``::1`` of the /64), if IPv6 is on."""
        if self.ipv6_subnet is None:
            return None
        return ipaddress.IPv6Interface(f"{self.ipv6_subnet.network_address + 1}/64")

    @property
    def dhcp_range(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        """Addresses dnsmasq leases: after the gateway up to the last host."""
        return self.subnet.network_address + 2, self.subnet.broadcast_address - 1


class NetworkSettings(BaseModel):
    """All network settings of a host: what the lead adds to HostConfig as one field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: ``network "name" { }`` blocks in HCL (key ``network``), or a map ``networks``.
    networks: dict[str, ManagedNetwork] = Field(
        default_factory=dict, validation_alias=AliasChoices("network", "networks"))
    #: Host bridges (not managed by vmdriver) jobs may attach taps to.
    allowed_bridges: tuple[str, ...] = ()
    #: Host devices jobs may put macvtap NICs on.
    allowed_devices: tuple[str, ...] = ()

    @field_validator("networks", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> dict[str, Any]:
        return _labelled_networks(value)

    @field_validator("allowed_bridges", "allowed_devices", mode="before")
    @classmethod
    def _names(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ValueError("expected a list of interface names")  # noqa: TRY004
        return tuple(_ifname(v, f"item {i}") for i, v in enumerate(value))

    @model_validator(mode="after")
    def _distinct_bridges(self) -> NetworkSettings:
        seen: dict[str, str] = {}
        for net in self.networks.values():
            if net.bridge in seen:
                raise ValueError(f"networks {seen[net.bridge]!r} and {net.name!r} both use "
                                 f"bridge {net.bridge!r}")
            seen[net.bridge] = net.name
        return self

    def network_for_bridge(self, bridge: str) -> ManagedNetwork | None:
        """The managed network whose bridge this is, if any."""
        return next((n for n in self.networks.values() if n.bridge == bridge), None)


def _labelled_networks(value: Any) -> dict[str, Any]:
    """``network "x" { }`` blocks from python-hcl2 (a list of {label: body}) or a map."""
    items: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        for block in value:
            if not isinstance(block, dict) or len(block) != 1:
                raise ValueError("expected network \"name\" { ... } blocks")
            items.extend(block.items())
    else:
        raise ValueError("expected network \"name\" { ... } blocks")  # noqa: TRY004
    out: dict[str, Any] = {}
    for name, body in items:
        if name in out:
            raise ValueError(f"network {name!r} is declared twice")
        if isinstance(body, ManagedNetwork):
            out[name] = body
            continue
        if not isinstance(body, dict):
            raise ValueError(f"network {name!r}: expected a block")  # noqa: TRY004
        out[name] = {"name": name, **body}
    return out


def network_settings_from_mapping(data: object, where: str = "host config") -> NetworkSettings:
    """Validate settings (HCL or msgpack); an error is one line naming the field."""
    try:
        return NetworkSettings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "network"
        msg = str(err["msg"]).removeprefix("Value error, ")
        value = None if err["type"] == "value_error" else err.get("input")
        raise HostConfigError(msg, where=f"{where}: {field}", value=value) from None


def check_nic(settings: NetworkSettings, *, bridge: str = "", device: str = "",
              where: str = "network_interface") -> None:
    """Refuse a NIC on a bridge or host device the operator did not allow.

    A managed network's bridge is always allowed; ``virbr0`` only when listed
    (it is used as is, never created).
    """
    if bridge:
        managed = [n.bridge for n in settings.networks.values()]
        allowed = [*managed, *settings.allowed_bridges]
        if bridge not in allowed:
            raise PolicyError("bridge not allowed by the host config", where=f"{where}.bridge",
                              value=bridge, allowed=allowed or "none (no managed networks)")
    if device and device not in settings.allowed_devices:
        raise PolicyError("host device not allowed for macvtap by the host config",
                          where=f"{where}.device", value=device,
                          allowed=settings.allowed_devices or "none (allowed_devices is empty)")
