"""The runner config: VM-Operator's keys and defaults, strict errors of one line each."""

# ruff: noqa: E501  (the error tables read best as one case per line)

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vmdriver.errors import SpecError
from vmdriver.runner.config import DEFAULT_CONFIG, RunnerConfig, load_config, parse_config

GIB = 1 << 30


def cfg(**vm: object) -> RunnerConfig:
    return parse_config({"/Runner": {"vm": {"name": "test-vm", **vm}}}, "c.yaml")


def error(data: object) -> str:
    with pytest.raises(SpecError) as info:
        parse_config(data, "c.yaml")
    text = str(info.value)
    assert "\n" not in text
    return text


def vm_error(**vm: object) -> str:
    return error({"/Runner": {"vm": {"name": "test-vm", **vm}}})


def test_defaults_are_vm_operators() -> None:
    c = cfg()
    assert Path("/etc/opt/vmrunner/config.yaml") == DEFAULT_CONFIG
    assert (c.data_dir, c.runtime_dir, c.update_template, c.guest_shutdown_stops) == (
        None, None, False, False)
    assert c.template == "standard.j2" and c.reset_counter is None and c.cloud_init is None
    vm = c.vm
    assert (vm.firmware, vm.use_tpm, vm.boot_menu, vm.powerdown_timeout) == ("uefi", False, False, 900)
    assert (vm.cpu_model, vm.maximum_cpus, vm.current_cpus, vm.accelerator) == ("host", 1, 1, "kvm")
    assert (vm.sockets, vm.dies_per_socket, vm.cores_per_die, vm.threads_per_core) == (0, 0, 0, 0)
    assert (vm.rtc_base, vm.rtc_clock, vm.maximum_ram, vm.current_ram) == ("utc", "rt", None, None)
    # One tap NIC on qemu-bridge-helper's default bridge, no drives, no SPICE.
    assert [(n.type, n.device, n.bridge) for n in vm.network] == [("tap", "virtio-net", None)]
    assert vm.drives == () and vm.display.spice is None and vm.display.outputs == 1


@pytest.mark.parametrize(("text", "size"), [
    ("1G", GIB), ("1Gi", GIB), ("1 GiB", GIB), ("1GiB", GIB), (GIB, GIB), (str(GIB), GIB),
    ("1536 MiB", 1536 << 20), ("2 GB", 2 * 10**9),
])
def test_memory_sizes(text: object, size: int) -> None:
    assert cfg(maximumRam=text).vm.maximum_ram == size


def test_full_config_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("""\
"/Runner":
  dataDir: /var/local/vm-data
  runtimeDir: /run/vm
  updateTemplate: true
  guestShutdownStops: true
  resetCounter: 3
  cloudInit:
    metaData: {instance-id: v1}
    userData: {users: [{name: test}]}
  vm:
    name: test-vm
    uuid: 3C0A51C4-1D7E-4D6B-9B3A-8A8E9FF3C4A1
    useTpm: true
    firmware: secure-4m
    bootMenu: true
    powerdownTimeout: 15m
    maximumRam: 4 GiB
    currentRam: 2Gi
    cpuModel: Skylake-Server
    maximumCpus: 4
    currentCpus: 2
    sockets: 1
    diesPerSocket: 1
    coresPerDie: 2
    threadsPerCore: 2
    accelerator: tcg
    rtcBase: localtime
    rtcClock: vm
    network:
      - {type: tap, bridge: br0, mac: "52:54:00:12:34:56"}
      - {type: user, device: e1000e, net: 10.1.2.0/24}
    drives:
      - {type: raw, resource: /dev/vg/test-vm, bootindex: 0}
      - {type: ide-cd, file: /srv/iso/debian.iso}
      - {type: ide-cd}
    display:
      outputs: 2
      loggedInUser: alice
      spice: {port: 5910, usbRedirects: 0, streamingVideo: filter}
""")
    c = load_config(path)
    assert (c.data_dir, c.runtime_dir, c.reset_counter) == (Path("/var/local/vm-data"), Path("/run/vm"), 3)
    assert c.cloud_init is not None and c.cloud_init.meta_data == {"instance-id": "v1"}
    vm = c.vm
    assert vm.uuid == "3c0a51c4-1d7e-4d6b-9b3a-8a8e9ff3c4a1"
    assert (vm.firmware, vm.powerdown_timeout, vm.maximum_ram, vm.current_ram) == (
        "secure-4m", 900, 4 * GIB, 2 * GIB)
    assert (vm.sockets, vm.dies_per_socket, vm.cores_per_die, vm.threads_per_core) == (1, 1, 2, 2)
    assert [n.type for n in vm.network] == ["tap", "user"] and vm.network[1].net == "10.1.2.0/24"
    assert [d.type for d in vm.drives] == ["raw", "ide-cd", "ide-cd"]
    assert vm.drives[0].resource == "/dev/vg/test-vm" and vm.drives[2].file is None
    assert vm.display.spice is not None and vm.display.spice.port == 5910
    with pytest.raises(Exception, match="frozen"):
        vm.name = "x"  # type: ignore[misc]


def test_current_cpus_raise_maximum() -> None:
    assert cfg(currentCpus=3).vm.maximum_cpus == 3
    assert cfg(currentCpus=2, maximumCpus=4).vm.maximum_cpus == 4


def test_sample_misspellings_are_read_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        vm = cfg(cpuSockets=2, coresPerSocket=4, accelertor="tcg",
                 display={"spice": {"streaming-video": "off"}}).vm
    assert (vm.sockets, vm.cores_per_die, vm.accelerator) == (2, 4, "tcg")
    assert vm.display.spice is not None and vm.display.spice.streaming_video == "off"
    warned = " ".join(r.getMessage() for r in caplog.records)
    for old, new in (("cpuSockets", "sockets"), ("coresPerSocket", "coresPerDie"),
                     ("accelertor", "accelerator"), ("streaming-video", "streamingVideo")):
        assert f"'{old}'" in warned and f"'{new}'" in warned


def test_vm_operators_template_name_maps_to_ours(caplog: pytest.LogCaptureFixture) -> None:
    c = parse_config({"/Runner": {"template": "Standard-VM-latest.ftl.yaml", "vm": {"name": "v"}}}, "c")
    assert c.template == "standard.j2" and "FreeMarker" in caplog.text


@pytest.mark.parametrize(("vm", "expected"), [
    ({"cpuSocket": 2}, "c.yaml: vm.cpuSocket: unknown key 'cpuSocket'; did you mean 'sockets'?"),
    ({"maximumram": "1G"}, "vm.maximumram: unknown key 'maximumram'; did you mean 'maximumRam'?"),
    ({"maximum_ram": "1G"}, "did you mean 'maximumRam'?"),
    ({"drives": [{"type": "raw", "flie": "/x"}]}, "vm.drives[0].flie: unknown key 'flie'; did you mean 'file'?"),
    ({"display": {"spice": {"prot": 1}}}, "vm.display.spice.prot: unknown key 'prot'; did you mean 'port'?"),
    ({"spice": {"port": 5900}}, "vm.spice: 'spice' moved: write it as vm.display.spice"),
    ({"xyzzy": 1}, "vm.xyzzy: unknown key 'xyzzy' (allowed: accelerator, bootMenu,"),
    ({"cpuSockets": 1, "sockets": 2}, "vm.cpuSockets: both 'cpuSockets' and 'sockets' are given"),
    ({"maximumRam": "1X"}, "vm.maximumRam: not a size: '1X' (a byte count or a size like 1G"),
    ({"maximumRam": "1M"}, "vm.maximumRam: '1M' is less than the 16 MiB"),
    ({"currentRam": "2G"}, "vm.currentRam: 2147483648 bytes is more than maximumRam (1073741824 bytes)"),
    ({"firmware": "efi"}, "vm.firmware: input should be 'bios', 'uefi', 'uefi-4m', 'secure' or 'secure-4m' (got 'efi')"),
    ({"useTpm": "yes"}, "vm.useTpm: input should be a valid boolean (got 'yes')"),
    ({"maximumCpus": 0}, "vm.maximumCpus: input should be greater than or equal to 1 (got 0)"),
    ({"uuid": "nope"}, "vm.uuid: not a UUID: 'nope'"),
    ({"powerdownTimeout": "soon"}, "vm.powerdownTimeout: not a duration: 'soon'"),
    ({"rtcBase": "mars"}, "vm.rtcBase: not an RTC base: 'mars'"),
    ({"cpuModel": "host,+vmx"}, "vm.cpuModel: not a CPU model: 'host,+vmx'"),
    ({"name": "../etc"}, "vm.name: not a VM name: '../etc'"),
    ({"network": [{"type": "bridge"}]}, "vm.network[0].type: input should be 'tap' or 'user' (got 'bridge')"),
    ({"network": [{"type": "user", "bridge": "br0"}]}, "vm.network[0].bridge: a user network has no bridge"),
    ({"network": [{"net": "10.0.0.0/8"}]}, "vm.network[0].net: only a user network has a net"),
    ({"network": [{"mac": "52:54:00"}]}, "vm.network[0].mac: not a MAC address: '52:54:00'"),
    ({"drives": [{"type": "raw"}]}, "vm.drives[0]: a raw drive needs a file, device or resource"),
    ({"drives": [{"file": "/a", "device": "/b"}]}, "vm.drives[0]: give one of file, device, resource"),
    ({"drives": [{"type": "cdrom"}]}, "vm.drives[0].type: input should be 'raw' or 'ide-cd' (got 'cdrom')"),
    ({"drives": [{"file": "/a,format=qcow2"}]}, "vm.drives[0].file: path '/a,format=qcow2' must not contain ','"),
    ({"display": {"spice": {"port": 70000}}}, "vm.display.spice.port: input should be less than or equal to 65535"),
])
def test_bad_vm_values_name_the_key(vm: dict[str, object], expected: str) -> None:
    assert expected in vm_error(**vm)


@pytest.mark.parametrize(("data", "expected"), [
    ({"/runner": {}}, "c.yaml: /runner: unknown key '/runner'; did you mean '/Runner'?"),
    ({"/Runner": {"vm": {"name": "v"}}, "extra": 1}, "c.yaml: extra: unknown key 'extra'"),
    ({"/Runner": None}, "c.yaml: /Runner: expected a mapping of runner settings"),
    ([1, 2], "c.yaml: expected a mapping with the key '/Runner'"),
    ({"/Runner": {}}, "c.yaml: vm: required key is missing"),
    ({"/Runner": {"vm": {}}}, "c.yaml: vm.name: required key is missing"),
    ({"/Runner": {"vm": {"name": "v"}, "datadir": "/x"}}, "c.yaml: datadir: unknown key 'datadir'; did you mean 'dataDir'?"),
    ({"/Runner": {"vm": {"name": "v"}, "template": "My.ftl.yaml"}}, "c.yaml: template: 'My.ftl.yaml' is a FreeMarker template"),
    ({"/Runner": {"vm": {"name": "v"}, "template": "../x.j2"}}, "c.yaml: template: not a template name"),
    ({"/Runner": {"vm": {"name": "v"}, "resetCounter": "1"}}, "c.yaml: resetCounter: input should be a valid integer"),
    ({"/Runner": {"vm": {"name": "v"}, "cloudInit": {"userdata": {}}}}, "cloudInit.userdata: unknown key 'userdata'; did you mean 'userData'?"),
])
def test_bad_runner_values_name_the_key(data: object, expected: str) -> None:
    assert expected in error(data)


def test_file_errors_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match=r"nope.yaml: cannot read the runner config: No such file"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text('"/Runner":\n  vm: {name: [x\n')
    with pytest.raises(SpecError) as info:
        load_config(bad)
    assert str(info.value).startswith(f"{bad}:3: not valid YAML")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SpecError, match="cannot read the runner config"):
        load_config(binary)
