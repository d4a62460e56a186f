"""Real boots of the test guest: a runner config through the standard template, spec and argv;
and OVMF writing EFI variables into the VM's own vars copy, which later starts keep."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.runner.qmpclient import Qmp
from vmdriver.host.firmware import find_firmware, vars_file
from vmdriver.qemu.argv import DriveSource, RenderContext, render_argv
from vmdriver.runner.config import parse_config
from vmdriver.runner.paths import RunnerPaths, prepare_dirs
from vmdriver.runner.spec import PACKAGE_TEMPLATES, HostFacts, runner_spec
from vmdriver.spec import FileMedium

READY = "VMDRIVER-GUEST-READY"
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed"),
]


def wait_for(path: Path, word: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if word in text:
            return text
        if proc.poll() is not None:
            raise AssertionError(f"QEMU exited ({proc.returncode}): {text[-400:]}")
        time.sleep(0.2)
    raise AssertionError(f"{word!r} not seen within {timeout} s")


def guest_agent(path: Path, command: str) -> Any:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(path))
        f = s.makefile("rw")
        f.write(json.dumps({"execute": "guest-sync", "arguments": {"id": 99}}) + "\n")
        f.flush()
        while json.loads(f.readline()).get("return") != 99:
            pass
        f.write(json.dumps({"execute": command}) + "\n")
        f.flush()
        return json.loads(f.readline())["return"]


def test_runner_config_boots_through_the_standard_template(guest_dir: Path, state_dir: Path) -> None:
    disk = state_dir / "disk.raw"
    shutil.copyfile(guest_dir / "disk.raw", disk)
    config = parse_config({"/Runner": {"vm": {
        "name": "boot", "firmware": "bios", "accelerator": "tcg", "cpuModel": "max",
        "maximumRam": "256 MiB", "maximumCpus": 2, "powerdownTimeout": 30,
        "network": [{"type": "user"}],
        "drives": [{"type": "raw", "resource": str(disk), "bootindex": 0}, {"type": "ide-cd"}],
    }}}, "boot.yaml")
    paths = RunnerPaths(data_dir=state_dir / "data", runtime_dir=state_dir / "run")
    prepare_dirs(paths)
    spec = runner_spec(config, paths, HostFacts(spice=False, template_dirs=(PACKAGE_TEMPLATES,)))
    drives = {d.id: DriveSource(d.medium.path, d.medium.format or "raw")
              for d in spec.drives if isinstance(d.medium, FileMedium)}
    ctx = RenderContext(binary=Path(shutil.which("qemu-system-x86_64") or ""), accelerator="tcg",
                        runtime_dir=paths.runtime_dir, qmp_socket=paths.monitor_socket,
                        qga_socket=paths.guest_agent_socket, drives=drives, qmp_fd=None)
    console = state_dir / "console.log"
    with console.open("wb") as out:
        qemu = subprocess.Popen(render_argv(spec, ctx), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    qmp: Qmp | None = None
    try:
        deadline = time.monotonic() + 30
        while not paths.monitor_socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        qmp = Qmp(paths.monitor_socket)
        assert qmp("query-status")["status"] == "prelaunch"  # -S: the runner configures first
        qmp("cont")
        wait_for(console, READY, qemu)

        # The standard VM's pieces, as the runner's later steps will use them.
        assert "version" in guest_agent(paths.guest_agent_socket, "guest-info")
        assert qmp("query-balloon")["actual"] == 256 << 20
        cpus = qmp("query-hotpluggable-cpus")
        assert len(cpus) == 2 and sum("qom-path" in c for c in cpus) == 1  # one to hot-plug
        # -blockdev drives have no legacy name; key them by their device's id.
        block = {b["device"] or b["qdev"].removeprefix("/machine/peripheral/").split("/")[0]: b
                 for b in qmp("query-block")}
        assert "inserted" not in block["cd0"] and block["cd0"]["tray_open"] is False
        assert block["disk0"]["inserted"]["drv"] == "raw"
        assert qmp("qom-get", path="/machine/peripheral/usb", property="type") == "qemu-xhci"

        qmp("system_powerdown")
        assert qemu.wait(60) == 0
    finally:
        if qmp is not None:
            qmp.close()
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait()


def test_ovmf_writes_the_vms_own_vars_and_they_are_kept(guest_dir: Path, state_dir: Path) -> None:
    fw = find_firmware("uefi-4m")
    if fw is None or not fw.code.exists():
        pytest.skip("OVMF is not installed")
    data = state_dir / "data"
    data.mkdir()
    vars_path = vars_file(data, fw)
    pristine = hashlib.sha256(fw.vars_template.read_bytes()).hexdigest()
    console = state_dir / "console.log"
    # A direct kernel boot through OVMF (the guest's disk images boot with a BIOS only);
    # mode=poweroff makes the guest power off once it is up.
    qemu = subprocess.Popen((
        "qemu-system-x86_64", "-machine", "q35,accel=tcg,pflash0=code,pflash1=vars", "-m", "256",
        "-nodefaults", "-display", "none", "-nic", "none",
        "-blockdev", f"driver=file,filename={fw.code},node-name=code,read-only=on",
        "-blockdev", f"driver=file,filename={vars_path},node-name=vars",
        "-kernel", str(guest_dir / "vmlinuz"), "-initrd", str(guest_dir / "initrd.img"),
        "-append", (guest_dir / "cmdline").read_text().strip() + " vmdriver.mode=poweroff",
        "-serial", f"file:{console}"), stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert qemu.wait(180) == 0
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
    assert READY in console.read_text(errors="replace")
    written = hashlib.sha256(vars_path.read_bytes()).hexdigest()
    assert written != pristine, "OVMF did not write the VM's vars copy"
    # The next start gets the same store back, not a fresh copy.
    assert hashlib.sha256(vars_file(data, fw).read_bytes()).hexdigest() == written
