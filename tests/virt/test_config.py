"""The virt task config and schemas as pure logic: both input shapes, defaults, the mapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.nomad.nomadsim import cty_msgpack
from vmdriver.errors import HostError, SpecError
from vmdriver.host.config import HostConfig, host_config_from_mapping
from vmdriver.jobfile.dialects import DIALECTS, dialect_for_plugin
from vmdriver.jobfile.hostcheck import check_host
from vmdriver.jobfile.inputs import AllocatedPort, TaskInputs
from vmdriver.jobfile.placement import Placement
from vmdriver.jobfile.virt import build_spec, provision, release
from vmdriver.jobfile.virt_config import host_arch, parse_config
from vmdriver.nomad.codec import decode_config
from vmdriver.nomad.hclspec import host_config_spec, task_config_spec, without_nulls
from vmdriver.runtime.taskdir import TaskDir
from vmdriver.spec import Accelerator, FileMedium, MacvtapNic, TapNic, UserNic

#: One config as python-hcl2 reads it from a job file: every block a list of bodies.
HCL_SHAPE: dict[str, Any] = {
    "disk": [{"primary": True, "chained": True, "source": [{"image": "local/disk.qcow2"}]},
             {"size": "1GiB", "bus_type": "scsi"}],
    "os": [{"machine": "q35"}],
    "hostname": "web-1",
    "network_interface": [{"bridge": [{"name": "virbr0", "ports": ["http"]}]}],
}
#: The same as Nomad sends it (hcldec + go-cty msgpack): nil for every unset attribute.
NOMAD_SHAPE: dict[str, Any] = {
    "disk": [{"primary": True, "chained": True, "size": None, "pool": None, "sparse": None,
              "source": {"image": "local/disk.qcow2", "volume": None, "format": None}},
             {"size": "1GiB", "bus_type": "scsi", "primary": None, "source": None}],
    "os": {"arch": None, "machine": "q35"},
    "hostname": "web-1", "cmds": None, "user_data": None, "timezone": None,
    "network_interface": [{"bridge": {"name": "virbr0", "ports": ["http"]}, "macvtap": None}],
}


def inputs(**kw: Any) -> TaskInputs:
    base: dict[str, Any] = {"name": "web", "where": "job.hcl: task 'web'",
                            "ports": (AllocatedPort("http", 20001, 8080),
                                      AllocatedPort("ssh", 20002, 22))}
    base.update(kw)
    return TaskInputs(**base)


def test_both_input_shapes_give_the_same_config() -> None:
    a = parse_config(HCL_SHAPE, "t")
    b = parse_config(NOMAD_SHAPE, "t")
    assert a.disks == b.disks  # the raw disk bodies differ; what parse_disks made does not
    assert a.task.model_copy(update={"disk": []}) == b.task.model_copy(update={"disk": []})
    assert a.task.os.machine == "q35" and a.task.os.arch == host_arch()
    assert [d.primary for d in a.disks] == [True, False]
    assert [d.devname for d in a.disks] == ["vda", "sda"]


def test_defaults_and_the_spec() -> None:
    cfg = parse_config({"disk": [{"source": [{"image": "local/d.qcow2"}]}]}, "t")
    assert cfg.task.os.machine == "pc" and cfg.emulator == host_arch()
    spec = build_spec(cfg, inputs(cores=2, memory_mb=512, cpu_shares=700, cpuset=(2, 3)))
    assert spec.guest_agent and spec.shutdown.graceful and spec.shutdown.via_agent
    assert spec.accelerator is Accelerator.AUTO  # the host config decides at provision
    assert (spec.resources.cores, spec.resources.memory_mib) == (2, 512)
    assert spec.resources.cpu_shares == 700 and spec.resources.cpuset == (2, 3)
    (nic,) = spec.nics
    # No network_interface: user-mode networking with every job port forwarded.
    assert isinstance(nic, UserNic)
    assert [(f.label, f.host_port, f.guest_port) for f in nic.forwards] == [
        ("http", 20001, 8080), ("ssh", 20002, 22)]
    assert spec.drives == ()  # the volumes come at provision


def test_bridge_and_macvtap_interfaces() -> None:
    spec = build_spec(parse_config(HCL_SHAPE, "t"), inputs())
    (tap,) = spec.nics
    assert isinstance(tap, TapNic) and tap.bridge == "virbr0"
    assert [(f.label, f.host_port, f.guest_port) for f in tap.forwards] == [("http", 20001, 8080)]
    mac = parse_config({**HCL_SHAPE, "network_interface": [{"macvtap": [{"device": "eth0"}]}]}, "t")
    (nic,) = build_spec(mac, inputs()).nics
    assert isinstance(nic, MacvtapNic) and (nic.device, nic.mode) == ("eth0", "bridge")


@pytest.mark.parametrize(("raw", "where"), [
    ({"disk": [{"size": "1G"}], "os": [{"machine": "isapc"}]}, "t.config.os.machine"),
    ({"disk": [{"size": "1G"}], "os": [{"cpu": "host"}]}, "t.config.os.cpu"),
    ({"disk": [{"size": "1G"}], "cmds": "echo"}, "t.config.cmds"),
    ({"disk": [{"size": "1G"}], "network_interface": [{}]}, "t.config.network_interface[0]"),
    ({"disk": [{"volume": "/dev/vdb"}]}, "job.hcl: task 'web'.config.disk[0].volume"),
    ({"disk": [{"size": "1G"}], "hostname": "-x"}, "job.hcl: task 'web'.config.hostname"),
])
def test_errors_name_the_field(raw: dict[str, Any], where: str) -> None:
    with pytest.raises(SpecError) as exc:
        task = "t" if where.startswith("t.") else "job.hcl: task 'web'"
        build_spec(parse_config(raw, task), inputs())
    assert exc.value.where == where, exc.value


def test_env_errors_name_the_task_env() -> None:
    cfg = parse_config({"disk": [{"size": "1G"}]}, "t")
    with pytest.raises(SpecError) as exc:
        build_spec(cfg, inputs(env={"BAD": "a\0b"}))
    assert exc.value.where == "job.hcl: task 'web'.env.BAD"


def test_libvirt_provider_is_refused_at_task_start(tmp_path: Path) -> None:
    host = HostConfig(state_dir=tmp_path, provider=[{"libvirt": {"uri": "qemu:///system"}}])
    cfg = parse_config({"disk": [{"size": "1G"}]}, "t")
    spec = build_spec(cfg, inputs())
    with pytest.raises(HostError, match="libvirt provider is not available in this backend"):
        provision(cfg, inputs(), spec, Placement(host, "a" * 36, TaskDir(tmp_path, "web")))


def test_plugin_names_pick_the_virt_dialect() -> None:
    assert dialect_for_plugin("virt").name == "virt"
    assert dialect_for_plugin("nomad-driver-virt").name == "virt"
    assert dialect_for_plugin("vmdriver").name == "qemu"


def test_task_schema_has_the_virt_blocks() -> None:
    spec = task_config_spec(DIALECTS["virt"]).object.attributes
    disk = spec["disk"].block_list
    assert disk.name == "disk"
    assert disk.nested.object.attributes["source"].block_value.name == "source"
    assert spec["os"].block_value.nested.object.attributes["machine"].Attr.type == "string"
    iface = spec["network_interface"].block_list.nested.object.attributes
    assert iface["bridge"].block_value.nested.object.attributes["ports"].Attr.type == "list(string)"
    assert spec["cmds"].Attr.type == "list(string)"
    # Every other config field is an attribute, so Nomad's HCL accepts each key the model has.
    from vmdriver.jobfile.virt_config import VirtTaskConfig
    assert set(spec) == set(VirtTaskConfig.model_fields)


def test_agent_config_blocks_decode_into_the_host_config(tmp_path: Path) -> None:
    schema = host_config_spec()
    attrs = schema.object.attributes
    assert attrs["storage_pools"].block_value.nested.object.attributes[
        "directory"].block_map.labels == ["name"]
    assert attrs["provider"].block_map.name == "provider"
    # What hcldec makes of `storage_pools { directory "local" { path = ... } }`.
    sent = {"state_dir": str(tmp_path), "provider": {}, "network": {},
            "storage_pools": {"default": None, "ceph": {},
                              "directory": {"local": {"path": str(tmp_path / "pool")}}}}
    data = without_nulls(decode_config(cty_msgpack(sent, schema), where="cfg"))
    host = host_config_from_mapping(data, "cfg")
    pools = check_host(host).storage
    assert pools.default == "local" and pools.names == ("local",)


def test_provision_makes_volumes_seed_and_shares(tmp_path: Path, guest_dir: Path) -> None:
    pool = tmp_path / "pool"
    host = HostConfig(state_dir=tmp_path, image_paths=(str(guest_dir),), virt_accelerator="tcg",
                      storage_pools=[{"directory": [{"local": [{"path": str(pool)}]}]}])
    cfg = parse_config({"disk": [{"primary": True, "chained": True,
                                  "source": [{"image": str(guest_dir / "disk.qcow2")}]},
                                 {"size": "64MiB"}],
                        "default_user_password": "plain-Secret"}, "t")
    task_dir = TaskDir(tmp_path / "alloc", "web")
    task_dir.create()
    alloc = "0123abcd-0000-0000-0000-000000000000"
    env = {"NOMAD_ALLOC_ID": alloc, "NOMAD_ALLOC_DIR": str(task_dir.shared)}
    spec = build_spec(cfg, inputs(env=env))
    made = provision(cfg, inputs(env=env), spec, Placement(host, alloc, task_dir))
    try:
        s = made.spec
        assert s.accelerator is Accelerator.TCG  # from virt_accelerator
        assert [d.id for d in s.drives] == ["disk0", "disk1"]
        assert s.drives[0].boot_index == 1 and s.drives[0].serial == "vda"
        # Exactly this task's files are admitted: its two volumes and the primary's base.
        files_of = {Path(d.medium.path).name for d in s.drives if isinstance(d.medium, FileMedium)}
        bases = {p.name for p in (pool / ".vmdriver" / "bases").iterdir()}
        assert {p.name for p in made.image_paths} == files_of | bases
        assert {(sh.tag, sh.path) for sh in s.shares} == {
            ("local", str(task_dir.local)), ("alloc", str(task_dir.shared)),
            ("secrets", str(task_dir.secrets))}
        assert all(sh.read_only for sh in s.shares)
        assert s.seed is not None
        files = dict(s.seed.files)
        assert "local-hostname: web-0123abcd" in files["meta-data"]
        assert "plain-Secret" not in "".join(files.values())
        assert "$6$" in files["user-data"] and "NOMAD_ALLOC_DIR=/alloc\n" in files["user-data"]
    finally:
        release(host, alloc, "web")
    assert not any(p.name != ".vmdriver" for p in pool.iterdir())


def test_preview_shows_the_drives_and_makes_nothing(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    host = HostConfig(state_dir=tmp_path, virt_accelerator="tcg",
                      storage_pools=[{"directory": [{"local": [{"path": str(pool)}]}]}])
    cfg = parse_config({"disk": [{"primary": True, "source": [{"image": "local/missing.qcow2"}]},
                                 {"kind": "cdrom", "source": [{"image": "local/x.iso"}]}],
                        "default_user_password": "pw", "user_data": "local/not-yet"}, "t")
    spec = build_spec(cfg, inputs())
    task_dir = TaskDir(tmp_path / "alloc", "web")
    made = provision(cfg, inputs(), spec, Placement(host, "0123abcd-x", task_dir, preview=True))
    paths = [d.medium.path for d in made.spec.drives if isinstance(d.medium, FileMedium)]
    assert paths == [str(pool / "0123abcd-web-0.qcow2"), str(pool / "0123abcd-web-1.raw")]
    assert made.spec.seed is not None and made.spec.shares
    assert not pool.exists() and not task_dir.path.exists()


def test_task_dirs_go_over_9p_without_virtiofsd(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vmdriver.jobfile.virt.VIRTIOFSD", tmp_path / "no-virtiofsd")
    host = HostConfig(state_dir=tmp_path, virt_accelerator="tcg")
    cfg = parse_config({"disk": [{"size": "1G"}]}, "t")
    made = provision(cfg, inputs(), build_spec(cfg, inputs()),
                     Placement(host, "0123abcd-x", TaskDir(tmp_path / "a", "web"), preview=True))
    assert {s.transport for s in made.spec.shares} == {"9p"}
    assert made.spec.seed is not None
    assert "mount -t 9p" in dict(made.spec.seed.files)["user-data"]
