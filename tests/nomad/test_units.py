"""Logic of the plugin without a plugin process: cgroups, msgpack decoding, schemas, statuses."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path

import grpc
import msgpack
import pytest

from tests.nomad.nomadsim import cty_msgpack
from vmdriver.errors import AcceleratorUnavailable, InputError, LaunchError, SpecError, TaskNotFound
from vmdriver.host.config import HostConfig
from vmdriver.jobfile.dialects import DIALECTS
from vmdriver.jobfile.qemu import QemuTaskConfig
from vmdriver.nomad.codec import decode_config
from vmdriver.nomad.hclspec import hcl_type, host_config_spec, task_config_spec
from vmdriver.nomad.proto import status_pb2, structs_pb2
from vmdriver.nomad.status import DETAILS_KEY, status_for
from vmdriver.runtime import cgroup

# Section: cgroups


def test_memory_limit_has_headroom_over_guest_ram() -> None:
    # 300 MiB TCG guest, one vCPU: 192 + 300/8 + 4 + 256 = 489 MiB on top.
    assert cgroup.memory_headroom_mib(300, 1, "tcg") == 489
    assert cgroup.memory_limit_mib(300, 1, "tcg") == 789
    # KVM has no translation cache; more RAM and vCPUs need more.
    assert cgroup.memory_headroom_mib(4096, 4, "kvm") == 192 + 512 + 16
    # A higher limit from the scheduler (memory_max) wins.
    assert cgroup.memory_limit_mib(300, 1, "kvm", task_limit_mib=2048) == 2048


def test_shares_to_weight() -> None:
    assert cgroup.shares_to_weight(2) == 1
    assert cgroup.shares_to_weight(262144) == 10000
    assert cgroup.shares_to_weight(1024) == 39
    assert cgroup.shares_to_weight(0) == 1


def _fake_v1(root: Path) -> None:
    for ctrl in ("memory", "cpu", "cpuset"):
        (root / ctrl).mkdir(parents=True)
    (root / "cpuset" / "cpuset.cpus").write_text("0-3\n")
    (root / "cpuset" / "cpuset.mems").write_text("0\n")


def test_apply_v1_writes_limits_and_moves_the_pid(tmp_path: Path) -> None:
    _fake_v1(tmp_path)
    limits = cgroup.CgroupLimits(memory_max_bytes=512 << 20, cpu_shares=700, cpuset_cpus="1")
    placed = cgroup.apply(4242, limits, "alloc.task/x", parent="nomad", root=tmp_path)
    assert placed.mode is cgroup.CgroupMode.V1 and not placed.warnings
    mem = tmp_path / "memory" / "nomad" / "alloc.task_x"
    assert (mem / "memory.limit_in_bytes").read_text() == str(512 << 20)
    assert (mem / "cgroup.procs").read_text() == "4242"
    assert (tmp_path / "cpu" / "nomad" / "alloc.task_x" / "cpu.shares").read_text() == "700"
    cpuset = tmp_path / "cpuset" / "nomad" / "alloc.task_x"
    assert (cpuset / "cpuset.cpus").read_text() == "1"
    assert (cpuset / "cpuset.mems").read_text() == "0"  # copied down so the pid can join
    assert (tmp_path / "cpuset" / "nomad" / "cpuset.cpus").read_text() == "0-3"
    assert set(placed.paths) == {str(mem), str(cpuset), str(tmp_path / "cpu/nomad/alloc.task_x")}
    assert str(tmp_path / "memory" / "nomad") not in placed.created  # shared parent: never removed


def test_apply_v1_joins_nomads_cpuset_cgroup(tmp_path: Path) -> None:
    _fake_v1(tmp_path)
    nomads = tmp_path / "cpuset" / "nomad" / "reserve" / "a.t"
    nomads.mkdir(parents=True)
    limits = cgroup.CgroupLimits(cpuset_cpus="2")
    placed = cgroup.apply(7, limits, "a.t", parent="nomad", cpuset_cgroup=str(nomads), root=tmp_path)
    assert (nomads / "cgroup.procs").read_text() == "7"
    assert not (nomads / "cpuset.cpus").exists()  # Nomad sized it; not ours to change
    assert placed.paths == (str(nomads),) and placed.created == ()


def test_apply_v2_enables_controllers_down_the_tree(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    scope = tmp_path / "nomad.slice" / "share.slice" / "a.t.scope"
    limits = cgroup.CgroupLimits(memory_max_bytes=1 << 30, cpu_shares=1024)
    placed = cgroup.apply(9, limits, "a.t", cpuset_cgroup=str(scope), root=tmp_path)
    assert placed.mode is cgroup.CgroupMode.V2
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +cpu"
    assert (scope / "memory.max").read_text() == str(1 << 30)
    assert (scope / "cpu.weight").read_text() == "39"
    assert (scope / "cgroup.procs").read_text() == "9"


def test_apply_never_raises(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    os.chmod(tmp_path / "memory", 0o500)
    limits = cgroup.CgroupLimits(memory_max_bytes=1 << 30)
    if os.geteuid() == 0:  # root ignores the mode bits: use a file where a dir must go
        os.chmod(tmp_path / "memory", 0o700)
        (tmp_path / "memory" / "nomad").write_text("")
    placed = cgroup.apply(1, limits, "a.t", parent="nomad", root=tmp_path)
    assert placed.paths == () and placed.warnings and "cannot create cgroup" in placed.warnings[0]
    assert cgroup.apply(1, limits, "a.t", root=tmp_path / "none").mode is cgroup.CgroupMode.NONE


def test_remove_and_oom_kills(tmp_path: Path) -> None:
    d = tmp_path / "g"
    d.mkdir()
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cgroup.oom_kills([str(tmp_path / "h"), str(d)]) == 2
    cgroup.remove([str(d)])
    assert not d.exists()


# Section: msgpack as go-cty writes it


def test_decode_config_drops_nulls_and_reads_decimal_strings() -> None:
    data = cty_msgpack({"image_path": "a.img", "host_port": Decimal("8080"),
                        "guest_port": Decimal("0.1")}, task_config_spec(DIALECTS["qemu"]))
    raw = msgpack.unpackb(data)
    assert set(raw) == set(QemuTaskConfig.model_fields)  # every spec attribute present
    assert list(raw) == sorted(raw)
    assert raw["guest_port"] == "0.1"  # not exactly a float64: a string on the wire
    out = decode_config(data, where="t.config", numbers=frozenset({"host_port", "guest_port"}))
    assert out == {"image_path": "a.img", "host_port": 8080, "guest_port": 0.1}
    assert decode_config(b"", where="x") == {}


def test_decode_config_rejects_garbage() -> None:
    with pytest.raises(InputError, match="not valid msgpack"):
        decode_config(b"\xc1", where="t.config")
    with pytest.raises(InputError, match="not an object"):
        decode_config(msgpack.packb([1, 2]), where="t.config")
    unknown = msgpack.packb({"image_path": msgpack.ExtType(0, b"")})
    with pytest.raises(InputError, match=r"t.config.image_path: config value is not known"):
        decode_config(unknown, where="t.config")
    with pytest.raises(InputError, match="not a number"):
        decode_config(msgpack.packb({"host_port": "eighty"}), where="t", numbers=frozenset({"host_port"}))


# Section: schemas


def test_schemas_cover_every_field() -> None:
    assert set(host_config_spec().object.attributes) == set(HostConfig.model_fields)
    task = task_config_spec(DIALECTS["qemu"]).object.attributes
    assert set(task) == set(QemuTaskConfig.model_fields)
    assert task["port_map"].Attr.type == "list(map(number))"
    assert task["args"].Attr.type == "list(string)"
    assert task["graceful_shutdown"].Attr.type == "bool"
    assert task["accelerator"].Attr.type == "string"
    assert all(spec.Attr.name == name and not spec.Attr.required for name, spec in task.items())
    assert hcl_type(dict[str, int]) == "map(number)"
    assert hcl_type(tuple[str, ...] | None) == "list(string)"


# Section: statuses


def _recoverable(status: object) -> bool | None:
    for key, value in getattr(status, "trailing_metadata", ()):
        if key == DETAILS_KEY:
            st = status_pb2.Status.FromString(value)
            err = structs_pb2.RecoverableError()
            assert st.details[0].type_url.endswith("hashicorp.nomad.plugins.shared.structs.RecoverableError")
            assert st.details[0].Unpack(err)
            return err.recoverable
    return None


def test_status_mapping() -> None:
    bad = status_for(SpecError("memory out of bounds", where="vm.resources.memory", value=1))
    assert bad.code is grpc.StatusCode.INVALID_ARGUMENT and _recoverable(bad) is None
    assert bad.details == "vm.resources.memory: memory out of bounds (got 1)"
    crash = status_for(LaunchError("QEMU exited during start-up", exit_code=1))
    assert crash.code is grpc.StatusCode.FAILED_PRECONDITION and _recoverable(crash) is True
    nokvm = status_for(AcceleratorUnavailable("kvm requested but not usable"))
    assert _recoverable(nokvm) is False
    assert status_for(TaskNotFound("no task")).code is grpc.StatusCode.NOT_FOUND
    bug = status_for(KeyError("x"))
    assert bug.code is grpc.StatusCode.INTERNAL and "KeyError" in bug.details
