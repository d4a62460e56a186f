"""Pure logic of vmdriver.network: settings, names, address parsing, dnsmasq's command line."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from vmdriver.errors import HostConfigError, PolicyError, SpecError
from vmdriver.hclfile import loads
from vmdriver.network import NetworkSettings, check_nic, names, network_settings_from_mapping
from vmdriver.network.discovery import from_agent, from_leases, slaac_address
from vmdriver.network.dnsmasq import dnsmasq_argv
from vmdriver.network.macvtap import kernel_mode
from vmdriver.network.spec import nic_requests, port_maps
from vmdriver.spec import MacvtapNic, TapNic, UserNic
from vmdriver.spec.devices import PortForward

HCL = """
network "default" {
  bridge      = "vmdbr0"
  subnet      = "192.168.122.0/24"
  ipv6_subnet = "fd00:122::/64"
}
network "dmz" {
  bridge = "vmdbr1"
  subnet = "10.9.0.0/28"
  nat    = false
  dns    = false
}
allowed_bridges = ["virbr0"]
allowed_devices = ["eth1"]
"""


def test_settings_from_hcl_blocks() -> None:
    s = network_settings_from_mapping(loads(HCL, "host.hcl"))
    net = s.networks["default"]
    assert (net.name, net.bridge, str(net.gateway), str(net.gateway6)) == \
        ("default", "vmdbr0", "192.168.122.1/24", "fd00:122::1/64")
    assert [str(a) for a in net.dhcp_range] == ["192.168.122.2", "192.168.122.254"]
    assert s.networks["dmz"].nat is False
    assert s.network_for_bridge("vmdbr1") is s.networks["dmz"]


@pytest.mark.parametrize(("body", "needle"), [
    ({"networks": {"n": {"bridge": "this-name-is-too-long", "subnet": "10.0.0.0/24"}}}, "interface name"),
    ({"networks": {"n": {"bridge": "br0", "subnet": "10.0.0.1/24"}}}, "host bits"),
    ({"networks": {"n": {"bridge": "br0", "subnet": "10.0.0.0/30"}}}, "/29 or larger"),
    ({"networks": {"n": {"bridge": "br0", "subnet": "10.0.0.0/24", "ipv6_subnet": "fd00::/48"}}}, "/64"),
    ({"networks": {"a": {"bridge": "br0", "subnet": "10.0.0.0/24"},
                   "b": {"bridge": "br0", "subnet": "10.1.0.0/24"}}}, "both use bridge"),
    ({"networks": {"n": {"bridge": "br0", "subnet": "10.0.0.0/24", "nat": "yes"}}}, "boolean"),
    ({"allowed_devices": "eth1"}, "list"),
    ({"networks": {"n": {"bridge": "br0", "subnet": "10.0.0.0/24", "colour": 1}}}, "xtra"),
])
def test_bad_settings_are_one_line_errors(body: dict[str, object], needle: str) -> None:
    with pytest.raises(HostConfigError) as exc:
        network_settings_from_mapping(body, "host.hcl")
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    assert str(exc.value).startswith("host.hcl: ")


def test_policy_default_is_managed_networks_only() -> None:
    s = NetworkSettings.model_validate({"networks": {"n": {"bridge": "vmdbr0", "subnet": "10.0.0.0/24"}}})
    check_nic(s, bridge="vmdbr0")
    with pytest.raises(PolicyError, match="allowed: vmdbr0"):
        check_nic(s, bridge="virbr0")
    with pytest.raises(PolicyError, match="allowed_devices is empty"):
        check_nic(s, device="eth0")
    check_nic(NetworkSettings(allowed_bridges=("virbr0",)), bridge="virbr0")
    with pytest.raises(PolicyError, match="no managed networks"):
        check_nic(NetworkSettings(), bridge="br0")


def test_names_fit_ifnamsiz_and_map_back_to_the_vm() -> None:
    vm = "5f1b0c6e-2a1d-4b3e-9f00-0123456789ab/web-server-with-a-long-name"
    tap, mvt = names.tap_name(vm, 15), names.macvtap_name(vm, 0)
    assert len(tap) <= 15 and len(mvt) <= 15
    assert tap == names.tap_name(vm, 15), "names must be deterministic"
    assert names.link_key(tap) == names.link_key(mvt) == names.vm_key(vm)
    assert names.chain_key(names.vm_chain(vm, "dnat")) == names.vm_key(vm)
    assert names.link_key("vmdbr0") is None and names.link_key("eth0") is None
    assert names.tap_name(vm, 0) != names.tap_name("other", 0)
    with pytest.raises(ValueError, match="out of range"):
        names.tap_name(vm, 16)


def test_default_macs_are_stable_locally_administered() -> None:
    mac = names.default_mac("a/b", 0)
    assert mac.startswith("52:54:00:") and mac == names.default_mac("a/b", 0)
    assert mac != names.default_mac("a/b", 1)
    assert int(names.bridge_mac("vmdbr0")[:2], 16) & 0x03 == 0x02  # local, unicast


def test_leases_pick_the_newest_lease_of_the_mac(tmp_path: Path) -> None:
    leases = tmp_path / "leases"
    leases.write_text("1700000000 52:54:00:aa:bb:cc 10.0.0.5 guest *\n"
                      "1700000900 52:54:00:AA:BB:CC 10.0.0.7 guest 01:52:54:00:aa:bb:cc\n"
                      "1700000500 52:54:00:11:22:33 10.0.0.6 * *\n"
                      "garbage\n")
    got = from_leases(leases, "52:54:00:aa:bb:cc")
    assert [str(a) for a in got.ipv4] == ["10.0.0.7"] and got.source == "dhcp-leases"
    assert not from_leases(tmp_path / "missing", "52:54:00:aa:bb:cc")


def test_agent_reply_gives_usable_addresses_of_the_nic() -> None:
    reply = [
        {"name": "lo", "hardware-address": "00:00:00:00:00:00",
         "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]},
        {"name": "eth0", "hardware-address": "52:54:00:aa:bb:cc", "ip-addresses": [
            {"ip-address-type": "ipv4", "ip-address": "10.0.0.5", "prefix": 24},
            {"ip-address-type": "ipv6", "ip-address": "fe80::5054:ff:feaa:bbcc%eth0", "prefix": 64},
            {"ip-address-type": "ipv6", "ip-address": "fd00::5054:ff:feaa:bbcc", "prefix": 64}]},
    ]
    got = from_agent(reply, "52:54:00:AA:BB:CC")
    assert [str(a) for a in got.addresses] == ["10.0.0.5", "fd00::5054:ff:feaa:bbcc"]
    assert got.source == "agent"
    assert not from_agent(None, "52:54:00:aa:bb:cc")


def test_slaac_address_is_eui64() -> None:
    addr = slaac_address(ipaddress.IPv6Network("fd00:213::/64"), "52:54:00:12:34:56")
    assert addr == ipaddress.IPv6Address("fd00:213::5054:ff:fe12:3456")


def test_dnsmasq_argv(tmp_path: Path) -> None:
    s = network_settings_from_mapping(loads(HCL, "host.hcl"))
    argv = dnsmasq_argv(s.networks["default"], tmp_path)
    assert argv[0] == "/usr/sbin/dnsmasq"
    for flag in ("--keep-in-foreground", "--conf-file=/dev/null", "--bind-interfaces",
                 "--interface=vmdbr0", "--enable-ra", "--no-ping",
                 "--dhcp-range=192.168.122.2,192.168.122.254,255.255.255.0,1h",
                 f"--pid-file={tmp_path}/network/default/dnsmasq.pid",
                 f"--dhcp-leasefile={tmp_path}/network/default/dnsmasq.leases"):
        assert flag in argv
    dmz = dnsmasq_argv(s.networks["dmz"], tmp_path)
    assert "--port=0" in dmz and "--enable-ra" not in dmz


def test_macvtap_modes() -> None:
    assert kernel_mode("passthrough") == "passthru"
    assert kernel_mode("vepa") == "vepa"
    with pytest.raises(SpecError, match="allowed: bridge, private, vepa, passthrough"):
        kernel_mode("promisc")


def test_spec_nics_and_forwards_map_to_requests() -> None:
    fwd = PortForward(label="http", host_port=20080, guest_port=8080, host_ip="10.0.0.1")
    nics = (UserNic(id="u0"), TapNic(id="lan", bridge="vmdbr0", mac="52:54:00:00:00:01", forwards=(fwd,)),
            MacvtapNic(id="wan", device="eth1", mode="vepa"))
    reqs = nic_requests(nics)
    assert [(r.index, r.kind, r.id, r.bridge, r.device, r.mode, r.mac) for r in reqs] == [
        (1, "tap", "lan", "vmdbr0", "", "bridge", "52:54:00:00:00:01"),
        (2, "macvtap", "wan", "", "eth1", "vepa", "")]
    (pm,) = port_maps((fwd,))
    assert (pm.host_port, pm.guest_port, pm.protocols) == (20080, 8080, ("tcp", "udp"))
    assert str(pm.host_ip) == "10.0.0.1"
