"""Pure logic of snapshots: device signatures, checks before a load, addresses, config keys."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from vmdriver.errors import InputError, SpecError
from vmdriver.host.config import HostConfig
from vmdriver.jobfile import qemu as qemu_dialect
from vmdriver.jobfile.inputs import TaskInputs
from vmdriver.qemu.argv import RenderContext, render_argv
from vmdriver.runtime.livemigrate import parse_address
from vmdriver.runtime.request import LaunchRequest
from vmdriver.runtime.snapshots import plan_start
from vmdriver.runtime.snapstore import (
    SnapshotDir,
    SnapshotError,
    SnapshotMeta,
    SnapshotStore,
    device_signature,
    signature_diff,
    version_tuple,
)
from vmdriver.runtime.taskdir import TaskDir, VMDirs
from vmdriver.spec import (
    Drive,
    FileMedium,
    PortForward,
    Resources,
    TapNic,
    UserNic,
    VMSpec,
)


def _spec(**update: object) -> VMSpec:
    base = VMSpec(name="a", vmgenid="auto",
                  drives=(Drive(id="disk0", medium=FileMedium(path="local/a.qcow2")),),
                  nics=(UserNic(id="net0", forwards=(PortForward(label="h", host_port=2000,
                                                                 guest_port=80),)),))
    return base.model_copy(update=update)


def _meta(spec: VMSpec, **update: object) -> SnapshotMeta:
    meta = SnapshotMeta(name="s", created_at=0, source="x", qemu_version="7.2.22",
                        machine="pc-i440fx-7.2", machine_alias="pc",
                        signature=device_signature(spec), memory_mib=512, state_size=4,
                        state_crc32=zlib.crc32(b"abcd"))
    return meta.model_copy(update=update)


def test_signature_ignores_what_a_clone_changes() -> None:
    clone = _spec(name="b", drives=(Drive(id="disk0", medium=FileMedium(path="/x/o.qcow2")),),
                  nics=(UserNic(id="net0", mac="52:54:00:00:00:01"),),
                  vmgenid="12345678-0000-0000-0000-000000000000")
    assert device_signature(clone) == device_signature(_spec())


@pytest.mark.parametrize(("update", "key"), [
    ({"resources": Resources(memory_mib=1024)}, "memory_mib"),
    ({"nics": (UserNic(id="net0", model="e1000"),)}, "nics"),
    ({"drives": (Drive(id="disk0", medium=FileMedium(path="a"), bus="ide"),)}, "drives"),
    ({"vmgenid": None}, "vmgenid"),
    ({"args": ("-device", "virtio-rng-pci")}, "args"),
])
def test_signature_sees_hardware(update: dict[str, object], key: str) -> None:
    diff = signature_diff(device_signature(_spec()), device_signature(_spec(**update)))
    assert diff and diff[0].startswith(f"{key}:")


def test_check_fits_refuses_older_qemu_other_machine_other_devices(tmp_path: Path) -> None:
    snap = SnapshotDir(tmp_path, "snapshot 's'")
    spec = _spec()
    snap.check_fits(_meta(spec), spec, "7.2.22")
    snap.check_fits(_meta(spec), spec, "8.0.0")  # a newer QEMU loads older streams
    snap.check_fits(_meta(spec), spec.model_copy(update={"machine_type": "pc-i440fx-7.2"}), None)
    with pytest.raises(SnapshotError, match="older"):
        snap.check_fits(_meta(spec), spec, "7.1.0")
    with pytest.raises(SnapshotError, match="machine"):
        snap.check_fits(_meta(spec), spec.model_copy(update={"machine_type": "q35"}), None)
    with pytest.raises(SnapshotError, match="other hardware"):
        snap.check_fits(_meta(spec), _spec(resources=Resources(memory_mib=64)), None)


def test_verify_finds_missing_truncated_damaged_and_empty(tmp_path: Path) -> None:
    snap = SnapshotDir(tmp_path, "snapshot 's'")
    meta = _meta(_spec())
    with pytest.raises(SnapshotError, match="missing"):
        snap.verify(meta)
    snap.state_file.write_bytes(b"ab")
    with pytest.raises(SnapshotError, match="truncated"):
        snap.verify(meta)
    snap.state_file.write_bytes(b"abcX")
    with pytest.raises(SnapshotError, match="damaged"):
        snap.verify(meta)
    snap.state_file.write_bytes(b"abcd")
    snap.verify(meta)
    with pytest.raises(SnapshotError, match="no saved state"):
        snap.verify(meta.model_copy(update={"state_size": None}))


def test_store_names_and_refusals(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    with pytest.raises(SnapshotError, match="no such snapshot"):
        store.load("nope")
    with pytest.raises(SnapshotError, match="valid snapshot name"):
        store.get("../x")
    snap = store.create("one")
    snap.save(_meta(_spec()))
    assert store.names() == ["one"]
    with pytest.raises(SnapshotError, match="exists"):
        store.create("one")
    assert [(m.name, used) for m, used in store.listing()] == [("s", False)]
    store.remove("one")
    assert store.names() == []


@pytest.mark.parametrize(("addr", "family"), [("unix:/a/b.sock", 1), ("/a/b.sock", 1),
                                                ("127.0.0.1:4000", 2), ("[::1]:4000", 10)])
def test_parse_address(addr: str, family: int) -> None:
    assert parse_address(addr)[0] == family


def test_parse_address_refuses_garbage() -> None:
    with pytest.raises(InputError, match="not a migration address"):
        parse_address("somewhere")


def test_version_tuple() -> None:
    assert version_tuple("7.2.22") == (7, 2, 22) < version_tuple("8.0.0")
    assert version_tuple("9.1.0-rc1") == (9, 1, 0)


def _req(tmp_path: Path, spec: VMSpec) -> LaunchRequest:
    task = TaskDir(tmp_path / "alloc", "t")
    return LaunchRequest(vm_id="a/t", spec=spec, dirs=VMDirs.under(tmp_path, "a/t", task))


def test_plan_start_refuses_snapshot_with_suspend_and_bridged_clones(tmp_path: Path) -> None:
    host = HostConfig(state_dir=tmp_path)
    with pytest.raises(SpecError, match="both"):
        plan_start(_req(tmp_path, _spec(snapshot="s", suspend=True)), host)
    tap = _spec(snapshot="s", nics=(TapNic(id="net0", bridge="br0"),))
    with pytest.raises(SnapshotError, match="need guest_agent"):
        plan_start(_req(tmp_path, tap), host)
    plain = _req(tmp_path, _spec())
    assert plan_start(plain, host) is plain


def test_qemu_dialect_keys_and_argv() -> None:
    cfg = qemu_dialect.parse_config({"image_path": "local/a.qcow2", "snapshot": "web-1",
                                     "suspend": False, "vmgenid": True}, "job")
    spec = qemu_dialect.build_spec(cfg, TaskInputs(name="t", where="job"))
    assert (spec.snapshot, spec.suspend, spec.vmgenid) == ("web-1", False, "auto")
    with pytest.raises(SpecError, match=r"config\.snapshot"):
        qemu_dialect.parse_config({"image_path": "a", "snapshot": "../x"}, "job")
    ctx = RenderContext(binary=Path("/usr/bin/qemu-system-x86_64"), accelerator="tcg",
                        runtime_dir=Path("/r"), qmp_socket=Path("/r/q"), qga_socket=Path("/r/g"),
                        drives={})
    argv = render_argv(spec.model_copy(update={"drives": (), "incoming": True}), ctx)
    assert "-incoming" in argv and argv[argv.index("-incoming") + 1] == "defer"
    assert "vmgenid,guid=auto,id=vmgenid0" in argv
    assert "-incoming" not in render_argv(spec.model_copy(update={"drives": ()}), ctx)


def test_virt_dialect_keys() -> None:
    from vmdriver.jobfile import virt, virt_config

    disk = [{"source": {"image": "local/disk.qcow2"}}]
    cfg = virt_config.parse_config({"suspend": True, "disk": disk}, "job")
    spec = virt.build_spec(cfg, TaskInputs(name="t", where="job"))
    assert (spec.snapshot, spec.suspend, spec.vmgenid) == (None, True, "auto")
    cfg = virt_config.parse_config({"snapshot": "base", "disk": disk}, "job")
    assert virt.build_spec(cfg, TaskInputs(name="t", where="job")).snapshot == "base"


def test_runner_vm_snapshot(tmp_path: Path) -> None:
    from vmdriver.runner.config import parse_config
    from vmdriver.runner.paths import RunnerPaths, prepare_dirs
    from vmdriver.runner.spec import PACKAGE_TEMPLATES, HostFacts, runner_spec

    paths = RunnerPaths(data_dir=tmp_path / "data", runtime_dir=tmp_path / "run")
    prepare_dirs(paths)
    facts = HostFacts(spice=False, template_dirs=(PACKAGE_TEMPLATES,))
    config = parse_config({"/Runner": {"vm": {"name": "a", "snapshot": "base"}}}, "c.yaml")
    assert runner_spec(config, paths, facts).snapshot == "base"
    plain = parse_config({"/Runner": {"vm": {"name": "a"}}}, "c.yaml")
    assert runner_spec(plain, paths, facts).snapshot is None
