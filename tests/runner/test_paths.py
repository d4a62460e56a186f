"""Data and runtime dirs: VM-Operator's fallbacks, sockets under an explicit runtimeDir, the UUID."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from vmdriver.errors import SpecError
from vmdriver.runner.config import RunnerConfig, parse_config
from vmdriver.runner.paths import machine_uuid, prepare_dirs, resolve_paths


def config(**runner: object) -> RunnerConfig:
    return parse_config({"/Runner": {"vm": {"name": "vm1"}, **runner}}, "c.yaml")


@pytest.mark.parametrize(("env", "data", "runtime"), [
    ({"XDG_DATA_HOME": "/xd", "XDG_RUNTIME_DIR": "/run/user/1", "HOME": "/h", "USER": "u"},
     "/xd/vmrunner/vm1", "/run/user/1/vmrunner/vm1"),
    ({"HOME": "/h", "USER": "u"}, "/h/.local/share/vmrunner/vm1", "/tmp/u/vmrunner/vm1"),
    ({}, "/cwd/vm1", "/tmp/vmrunner/vm1"),
])
def test_fallbacks(env: dict[str, str], data: str, runtime: str) -> None:
    paths = resolve_paths(config(), env, Path("/cwd"))
    assert (str(paths.data_dir), str(paths.runtime_dir)) == (data, runtime)


def test_explicit_runtime_dir_has_its_sockets() -> None:
    # VM-Operator left the swtpm and monitor sockets unset when runtimeDir was given.
    paths = resolve_paths(config(runtimeDir="/run/vm", dataDir="data"), {}, Path("/cwd"))
    assert paths.data_dir == Path("/cwd/data")
    assert paths.monitor_socket == Path("/run/vm/monitor.sock")
    assert paths.swtpm_socket == Path("/run/vm/swtpm.sock")
    assert paths.guest_agent_socket == Path("/run/vm/org.qemu.guest_agent.0")
    assert paths.status_file == Path("/run/vm/status.json")
    assert paths.vars_file == Path("/cwd/data/fw-vars.fd")


def test_runtime_dir_too_long_for_sockets() -> None:
    with pytest.raises(SpecError, match=r"socket path is 1\d\d bytes"):
        resolve_paths(config(runtimeDir="/" + "x" * 90), {}, Path("/"))


def test_prepare_and_uuid_persist(tmp_path: Path) -> None:
    c = config(dataDir=str(tmp_path / "d"), runtimeDir=str(tmp_path / "r"))
    paths = resolve_paths(c, {}, tmp_path)
    prepare_dirs(paths)
    assert stat.S_IMODE(paths.runtime_dir.stat().st_mode) == 0o700
    first = machine_uuid(c.vm, paths)
    assert paths.uuid_file.read_text() == first + "\n"
    assert machine_uuid(c.vm, paths) == first
    uuid = "3c0a51c4-1d7e-4d6b-9b3a-8a8e9ff3c4a1"
    given = parse_config({"/Runner": {"vm": {"name": "vm1", "uuid": uuid}}}, "c")
    assert machine_uuid(given.vm, paths) == "3c0a51c4-1d7e-4d6b-9b3a-8a8e9ff3c4a1"
    paths.uuid_file.write_text("garbage\n")
    with pytest.raises(SpecError, match=r"uuid\.txt: not a UUID"):
        machine_uuid(c.vm, paths)
