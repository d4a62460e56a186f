"""Config changes sorted into what the runner applies live and what needs a restart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vmdriver.runner.changes import diff
from vmdriver.runner.config import RunnerConfig, parse_config
from vmdriver.runner.status import RunState, Status, is_ready, read_status, write_status

GIB = 1 << 30
BASE: dict[str, Any] = {
    "resetCounter": 1,
    "vm": {"name": "v", "maximumRam": "4G", "currentRam": "2G", "maximumCpus": 4, "currentCpus": 2,
           "drives": [{"type": "raw", "file": "/d.img"}, {"type": "ide-cd", "file": "/a.iso"},
                      {"type": "ide-cd"}]},
}


def config(runner: dict[str, Any] | None = None, **vm: Any) -> RunnerConfig:
    data = json.loads(json.dumps(BASE))
    data.update(runner or {})
    data["vm"].update(vm)
    return parse_config({"/Runner": data}, "c.yaml")


def test_nothing_changed() -> None:
    changes = diff(config(), config())
    assert not changes.live and changes.restart_needed == ()


def test_live_changes() -> None:
    new = config({"resetCounter": 2, "guestShutdownStops": True}, currentRam="3 GiB", currentCpus=3,
                 powerdownTimeout=60, display={"loggedInUser": "alice"},
                 drives=[{"type": "raw", "file": "/d.img"}, {"type": "ide-cd"},
                         {"type": "ide-cd", "file": "/b.iso"}])
    c = diff(config(), new)
    assert (c.ram, c.cpus, c.powerdown_timeout) == (3 * GIB, 3, 60)
    assert c.reset and c.guest_shutdown_stops is True
    assert c.media == {"cd0": None, "cd1": "/b.iso"}  # eject cd0, load cd1
    assert c.logged_in_user_changed and c.logged_in_user == "alice"
    assert c.restart_needed == () and c.live


def test_reset_only_on_increase_of_a_set_counter() -> None:
    assert not diff(config(), config({"resetCounter": 0})).reset
    unset = parse_config({"/Runner": {"vm": {"name": "v"}}}, "c")
    assert not diff(unset, parse_config({"/Runner": {"resetCounter": 5, "vm": {"name": "v"}}}, "c")).reset


def test_restart_needed_is_reported_not_ignored() -> None:
    new = config({"template": "other.j2"}, maximumRam="8G", firmware="bios", cpuModel="max",
                 drives=[{"type": "raw", "file": "/e.img"}, {"type": "ide-cd", "file": "/a.iso"},
                         {"type": "ide-cd"}])
    c = diff(config(), new)
    assert set(c.restart_needed) == {"template", "vm.firmware", "vm.maximumRam", "vm.cpuModel",
                                     "vm.drives[0].file"}
    assert c.ram is None  # the running VM's ceiling stays 4G; its target did not change


def test_cpus_capped_at_the_running_maximum() -> None:
    c = diff(config(), config(currentCpus=6))
    assert c.cpus == 4 and "vm.maximumCpus" in c.restart_needed


def test_unset_current_ram_balloons_back_to_maximum() -> None:
    new = json.loads(json.dumps(BASE))
    del new["vm"]["currentRam"]
    assert diff(config(), parse_config({"/Runner": new}, "c")).ram == 4 * GIB


def test_another_number_of_cd_drives_needs_a_restart() -> None:
    c = diff(config(), config(drives=[{"type": "raw", "file": "/d.img"}, {"type": "ide-cd"}]))
    assert c.media == {} and "vm.drives.length" in c.restart_needed


def test_status_file(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    assert read_status(path) is None and not is_ready(path)
    status = Status.starting(config())
    assert (status.state, status.cpus, status.ram) == (RunState.STARTING, 1, 4 * GIB)
    write_status(path, status.to(RunState.BOOTED, cpus=2, osinfo={"id": "debian"}))
    assert is_ready(path) and json.loads(path.read_text())["state"] == "BOOTED"
    assert path.stat().st_mode & 0o777 == 0o644 and list(tmp_path.iterdir()) == [path]
    write_status(path, read_status(path).to(RunState.STOPPED, exit_code=0))  # type: ignore[union-attr]
    stopped = read_status(path)
    assert stopped is not None
    assert (stopped.cpus, stopped.ram, stopped.osinfo, stopped.exit_code) == (0, 0, None, 0)
    assert not is_ready(path)
    path.write_text("{half")
    assert read_status(path) is None
    assert RunState.TERMINATING.vm_running and not RunState.TERMINATING.vm_active
