"""`vmdriver runner` as a process, with real QEMU, swtpm and the test guest.

One runner boots the guest (jailed, as the default host config has it; TPM, balloon, a
second vCPU plugged while QEMU is paused, a third to hot-plug, a CD in cd0) and the
tests in this file's order act on it: status, an operator's own QMP client on
monitor.sock, live changes from config edits (balloon, CPU hotplug seen by the guest,
a CD change held back by a tray the guest locked, restart-needed keys, reset), then
kill -9 of the runner, a second runner that takes the VM over, and SIGTERM → the guest
agent's shutdown → exit 0 with no QEMU or swtpm left. A second boot: a guest without
an agent that ignores ACPI is terminated at powerdownTimeout, which a config edit
during the shutdown shortens.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.runner.qmpclient import Qmp
from vmdriver.qemu.agent import GuestAgent

READY = "VMDRIVER-GUEST-READY"
MiB = 1 << 20
VMDRIVER = (str(Path(sys.executable).parent / "vmdriver"),)
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed"),
]


@dataclass
class Run:
    """A runner process and its files."""

    dir: Path
    config: dict[str, Any]
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def config_file(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def runtime(self) -> Path:
        return self.dir / "run"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    def vm(self) -> dict[str, Any]:
        return dict(self.config["/Runner"]["vm"])

    def edit(self, **vm: Any) -> None:
        """Change vm keys (or top-level keys given as ``top_<key>``) the way an editor does."""
        for key, value in vm.items():
            if key.startswith("top_"):
                self.config["/Runner"][key[4:]] = value
            else:
                self.config["/Runner"]["vm"][key] = value
        write_config(self.config_file, self.config)

    def status(self) -> dict[str, Any]:
        return dict(json.loads((self.runtime / "status.json").read_text()))

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def write_config(path: Path, config: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config))
    tmp.replace(path)


def start_runner(directory: Path, config: dict[str, Any], *extra: str, log: str = "runner.log") -> Run:
    write_config(directory / "config.yaml", config)
    out = directory / log
    with out.open("ab") as f:
        proc = subprocess.Popen(
            (*VMDRIVER, "runner", "-c", str(directory / "config.yaml"),
             "--console", str(directory / "console.log"), *extra),
            stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    return Run(directory, config, proc, out)


def wait_until(what: str, check: Any, run: Run, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        if run.proc.poll() is not None:
            raise AssertionError(f"runner exited ({run.proc.returncode}) before {what}: {run.text()[-1500:]}")
        time.sleep(0.3)
    raise AssertionError(f"{what} not seen within {timeout} s; runner log: {run.text()[-1500:]}")


def booted(run: Run) -> bool:
    try:
        return bool(run.status()["state"] == "BOOTED")
    except (OSError, ValueError):
        return False


def qmp_once(run: Run, command: str, **arguments: Any) -> Any:
    # One short session each: the operator's socket serves one client at a time.
    client = Qmp(run.runtime / "monitor.sock")
    try:
        return client(command, **arguments)
    finally:
        client.close()


def agent(run: Run) -> GuestAgent:
    return GuestAgent(run.runtime / "org.qemu.guest_agent.0")


def guest_read(run: Run, path: str) -> str:
    return asyncio.run(agent(run).read_file(path)).decode()


def cd0(run: Run) -> dict[str, Any]:
    for block in qmp_once(run, "query-block"):
        # qdev is the device's id, or its QOM path in older QEMUs.
        if block.get("qdev", "").removeprefix("/machine/peripheral/").split("/")[0] == "cd0":
            return dict(block)
    raise AssertionError("no cd0")


def cd0_file(run: Run) -> str | None:
    inserted = cd0(run).get("inserted")
    return None if inserted is None else str(inserted["file"])


def processes(name: str, marker: str) -> list[psutil.Process]:
    """Processes called ``name`` whose command line mentions ``marker`` (this test's dir)."""
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == name and marker in " ".join(p.info["cmdline"] or ()):
            out.append(p)
    return out


def stop(run: Run) -> None:
    if run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait()


@pytest.fixture(scope="module")
def tpm_run(guest_dir: Path) -> Iterator[Run]:
    """A booted runner VM with a TPM, a balloon, 2 of 3 vCPUs and a CD in cd0."""
    if shutil.which("swtpm") is None:
        pytest.skip("swtpm is not installed")
    directory = tempfile_dir()
    shutil.copyfile(guest_dir / "disk.raw", directory / "disk.raw")
    shutil.copyfile(guest_dir / "guest.iso", directory / "a.iso")
    (directory / "b.iso").write_bytes(b"B" * 2048 * 16)  # another medium, told apart by name
    config = {"/Runner": {
        "dataDir": str(directory / "data"), "runtimeDir": str(directory / "run"), "resetCounter": 0,
        "vm": {"name": "rt", "firmware": "bios", "accelerator": "tcg", "cpuModel": "max",
               "useTpm": True, "maximumRam": "256 MiB", "currentRam": "256 MiB", "maximumCpus": 3,
               "currentCpus": 2,
               "powerdownTimeout": 60, "network": [{"type": "user"}],
               "drives": [{"type": "raw", "resource": str(directory / "disk.raw"), "bootindex": 0},
                          {"type": "ide-cd", "file": str(directory / "a.iso")}]}}}
    run = start_runner(directory, config)
    try:
        wait_until("BOOTED", lambda: booted(run), run, timeout=240)
        yield run
    finally:
        stop(run)
        for name in ("qemu-system-x86_64", "swtpm"):
            for p in processes(name, str(directory)):
                p.kill()


def tempfile_dir() -> Path:
    # Socket paths must stay under 108 bytes: pytest's tmp dirs can be long.
    return Path(tempfile.mkdtemp(prefix="vmr-", dir="/tmp"))


def qemu(run: Run) -> psutil.Process:
    (proc,) = processes("qemu-system-x86_64", str(run.dir))
    return proc


def guest_run(run: Run, *argv: str) -> str:
    """A command's stdout in the guest, through the agent."""
    async def go() -> str:
        ga = agent(run)
        pid = await ga.exec(list(argv))
        for _ in range(100):
            status = await ga.exec_status(pid)
            if status.exited:
                return status.stdout.decode(errors="replace")
            await asyncio.sleep(0.2)
        raise AssertionError(f"{argv} did not end in the guest")

    return asyncio.run(go())


def test_booted_status_and_states(tpm_run: Run) -> None:
    status = tpm_run.status()
    assert status["cpus"] == 2 and status["ram"] == 256 * MiB
    assert status["osinfo"]["id"] == "vmdriver-guest"
    states = [line.split("state ")[1] for line in tpm_run.text().splitlines() if ": state " in line]
    assert states == ["INITIALIZING", "STARTING", "BOOTING", "BOOTED"]
    # Without a host config the defaults apply: QEMU is jailed (a uid of its own).
    assert qemu(tpm_run).uids().real >= 200000


def test_second_vcpu_was_plugged_before_the_guest_ran(tpm_run: Run) -> None:
    """currentCpus: 2 is plugged while QEMU is paused, so the kernel boots with 2 CPUs."""
    assert "smp: Brought up 1 node, 2 CPUs" in guest_run(tpm_run, "/bin/dmesg")
    text = tpm_run.text()
    assert text.index("vCPUs at start: 2") < text.index("state BOOTING")


def test_monitor_sock_answers_an_operators_client(tpm_run: Run) -> None:
    assert qmp_once(tpm_run, "query-status")["status"] == "running"


def test_guest_sees_the_tpm(tpm_run: Run) -> None:
    # /sys/class/tpm/tpm0 exists only when the guest's tpm_tis driver found the TPM.
    assert guest_read(tpm_run, "/sys/class/tpm/tpm0/tpm_version_major").strip() == "2"
    assert processes("swtpm", str(tpm_run.dir)), "no swtpm runs for the VM"


def test_balloon_follows_current_ram(tpm_run: Run) -> None:
    tpm_run.edit(currentRam="192 MiB")
    wait_until("balloon at 192 MiB", lambda: qmp_once(tpm_run, "query-balloon")["actual"] == 192 * MiB,
               tpm_run, timeout=60)
    wait_until("ram in the status", lambda: tpm_run.status()["ram"] == 192 * MiB, tpm_run, timeout=30)


def test_cpu_hotplug_is_seen_online_by_the_guest(tpm_run: Run) -> None:
    assert guest_read(tpm_run, "/sys/devices/system/cpu/online").strip() == "0-1"
    tpm_run.edit(currentCpus=3)
    wait_until("cpu 2 online in the guest",
               lambda: guest_read(tpm_run, "/sys/devices/system/cpu/online").strip() == "0-2",
               tpm_run, timeout=60)
    slots = qmp_once(tpm_run, "query-hotpluggable-cpus")
    assert sorted(s.get("qom-path", "") for s in slots) == [
        "/machine/peripheral/cpu-1", "/machine/peripheral/cpu-2", "/machine/unattached/device[0]"]
    wait_until("cpus in the status", lambda: tpm_run.status()["cpus"] == 3, tpm_run, timeout=30)


def test_cd_change_waits_for_a_tray_the_guest_locked(tpm_run: Run) -> None:
    b = str(tpm_run.dir / "b.iso")
    first = cd0_file(tpm_run)
    assert first is not None and first.startswith("/dev/fdset/")  # a.iso, handed over as an fd
    # Linux locks a CD-ROM's door while the device is open: hold it open for a while.
    ga = agent(tpm_run)
    asyncio.run(ga.exec(["/bin/sh", "-c", "exec sleep 12 </dev/sr0"], capture=False))
    wait_until("tray locked", lambda: cd0(tpm_run).get("locked"), tpm_run, timeout=20)
    tpm_run.edit(drives=[*tpm_run.vm()["drives"][:1], {"type": "ide-cd", "file": b}])
    wait_until("pending change", lambda: tpm_run.status()["pending"] == ["cd0: tray locked by the guest"],
               tpm_run, timeout=20)
    assert cd0_file(tpm_run) == first  # held back while locked
    # The jailed QEMU cannot open b.iso by name: the runner hands it an fd, and the fd
    # set of a.iso is freed, so QEMU holds b.iso open and no longer a.iso.
    wait_until("medium changed", lambda: cd0_file(tpm_run) not in (first, None), tpm_run, timeout=60)
    assert cd0_file(tpm_run).startswith("/dev/fdset/")  # type: ignore[union-attr]
    wait_until("b.iso held, a.iso let go", lambda: open_isos(tpm_run) == {"b.iso"}, tpm_run,
               timeout=10)
    wait_until("nothing pending", lambda: tpm_run.status()["pending"] == [], tpm_run, timeout=10)
    # Eject: no file.
    tpm_run.edit(drives=[*tpm_run.vm()["drives"][:1], {"type": "ide-cd"}])
    wait_until("medium ejected", lambda: cd0_file(tpm_run) is None, tpm_run, timeout=30)
    wait_until("no ISO held", lambda: open_isos(tpm_run) == set(), tpm_run, timeout=10)


def open_isos(run: Run) -> set[str]:
    """The CD images QEMU holds open (its fds, seen from the host)."""
    return {Path(f.path).name for f in qemu(run).open_files() if f.path.endswith(".iso")}


def test_restart_needed_keys_are_reported(tpm_run: Run) -> None:
    tpm_run.edit(maximumRam="512 MiB", currentRam="192 MiB")
    wait_until("restart needed", lambda: "vm.maximumRam" in tpm_run.status()["restart_needed"],
               tpm_run, timeout=20)
    assert "takes effect when the VM starts again" in tpm_run.text()


def test_reset_counter_resets_the_guest(tpm_run: Run) -> None:
    assert tpm_run.console.read_text(errors="replace").count(READY) == 1
    tpm_run.edit(top_resetCounter=1)
    wait_until("second boot", lambda: tpm_run.console.read_text(errors="replace").count(READY) == 2,
               tpm_run, timeout=180)


def test_kill_9_then_a_new_runner_takes_over_and_term_stops_cleanly(tpm_run: Run) -> None:
    marker = str(tpm_run.dir)
    tpm_run.proc.send_signal(signal.SIGKILL)
    tpm_run.proc.wait()
    assert processes("qemu-system-x86_64", marker) and processes("swtpm", marker)
    again = start_runner(tpm_run.dir, tpm_run.config, log="runner2.log")
    tpm_run.proc = again.proc  # the fixture stops whatever runs at the end
    wait_until("BOOTED again", lambda: booted(again) and "took over" in again.text(), again, timeout=120)
    assert len(processes("qemu-system-x86_64", marker)) == 1  # the same VM, not a second one

    t0 = time.monotonic()
    again.proc.send_signal(signal.SIGTERM)
    assert again.proc.wait(90) == 0, again.text()[-1500:]
    took = time.monotonic() - t0
    assert "shutdown requested (poweroff)" in again.console.read_text(errors="replace")  # the agent's way
    assert "state TERMINATING" in again.text() and "state STOPPED" in again.text()
    assert not processes("qemu-system-x86_64", marker) and not processes("swtpm", marker)
    assert not again.runtime.exists()
    print(f"SIGTERM to exit through guest-shutdown: {took:.1f} s")


# Section: a guest that ignores the power button and has no agent

NO_AGENT = """{% extends "standard.j2" %}
{% block guest_agent %}false{% endblock %}
{% block extra_args %}
  - -fw_cfg
  - name=opt/vmdriver/mode,string=ignore-acpi
{% endblock %}
"""


def test_deaf_guest_is_terminated_at_powerdown_timeout_shortened_during_shutdown(
        guest_dir: Path) -> None:
    directory = tempfile_dir()
    templates = directory / "templates"
    templates.mkdir()
    (templates / "deaf.j2").write_text(NO_AGENT)
    shutil.copyfile(guest_dir / "disk.raw", directory / "disk.raw")
    config = {"/Runner": {
        "dataDir": str(directory / "data"), "runtimeDir": str(directory / "run"), "template": "deaf.j2",
        "vm": {"name": "deaf", "firmware": "bios", "accelerator": "tcg", "cpuModel": "max",
               "maximumRam": "256 MiB", "powerdownTimeout": 300, "network": [{"type": "user"}],
               "drives": [{"type": "raw", "resource": str(directory / "disk.raw"), "bootindex": 0}]}}}
    run = start_runner(directory, config, "--template-dir", str(templates))
    try:
        wait_until("guest up", lambda: "mode=ignore-acpi" in (run.console.read_text(errors="replace")
                                                             if run.console.exists() else ""),
                   run, timeout=240)
        assert run.status()["state"] == "BOOTING"  # no agent: never BOOTED, as in VM-Operator
        t0 = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        wait_until("terminating", lambda: "state TERMINATING" in run.text(), run, timeout=20)
        time.sleep(1)
        run.edit(powerdownTimeout=4)  # the 300 s deadline becomes 4 s after the stop began
        code = run.proc.wait(60)
        took = time.monotonic() - t0
        assert "ignoring power button" in run.console.read_text(errors="replace")
        assert "did not power off within powerdownTimeout (4 s)" in run.text()
        assert 4 <= took < 20, took
        assert code == 0, run.text()[-1500:]  # QEMU's own code: it exits 0 on SIGTERM
        assert not processes("qemu-system-x86_64", str(directory))
        print(f"deaf guest: SIGTERM to exit {took:.1f} s with powerdownTimeout shortened to 4 s")
    finally:
        stop(run)
        for p in processes("qemu-system-x86_64", str(directory)):
            p.kill()
        shutil.rmtree(directory, ignore_errors=True)


# Section: bad input, no boot


@pytest.mark.parametrize(("vm", "words"), [
    ({"name": "x", "cpuSocket": 1}, "unknown key 'cpuSocket'; did you mean 'sockets'?"),
    ({"name": "x", "maximumRam": "lots"}, "vm.maximumRam"),
    ({"name": "x", "drives": [{"type": "raw"}]}, "vm.drives[0]"),
    ({"name": "x", "maximumRam": "256 MiB", "currentRam": "1 GiB"}, "more than maximumRam"),
    ({}, "vm.name: required key is missing"),
])
def test_bad_configs_give_one_line_and_exit_2(tmp_path: Path, vm: dict[str, Any], words: str) -> None:
    config = tmp_path / "config.yaml"
    write_config(config, {"/Runner": {"runtimeDir": str(tmp_path / "run"), "vm": vm}})
    out = subprocess.run((*VMDRIVER, "runner", "-c", str(config)),
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in out.stderr, out.stderr


def test_missing_and_unparsable_config_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text('"/Runner":\n  vm: [unclosed\n')
    for path, words in ((tmp_path / "none.yaml", "cannot read the runner config"),
                        (bad, "not valid YAML")):
        out = subprocess.run((*VMDRIVER, "runner", "-c", str(path)),
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert words in out.stderr


def test_runner_help() -> None:
    out = subprocess.run((*VMDRIVER, "runner", "--help"),
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and "/etc/opt/vmrunner/config.yaml" in out.stdout


# Section: a guest that shuts itself down

POWEROFF = """{% extends "standard.j2" %}
{% block extra_args %}
  - -fw_cfg
  - name=opt/vmdriver/mode,string=poweroff
{% endblock %}
"""


def test_guest_shutdown_stops_keeps_the_runner_stopped_until_term(guest_dir: Path) -> None:
    """guestShutdownStops: the guest's own power-off is not followed by a pod restart
    (VM-Operator sets the VM's state to Stopped): the runner stays, STOPPED."""
    directory = tempfile_dir()
    templates = directory / "templates"
    templates.mkdir()
    (templates / "off.j2").write_text(POWEROFF)
    shutil.copyfile(guest_dir / "disk.raw", directory / "disk.raw")
    config = {"/Runner": {
        "dataDir": str(directory / "data"), "runtimeDir": str(directory / "run"), "template": "off.j2",
        "guestShutdownStops": True,
        "vm": {"name": "off", "firmware": "bios", "accelerator": "tcg", "cpuModel": "max",
               "maximumRam": "256 MiB", "network": [{"type": "user"}],
               "drives": [{"type": "raw", "resource": str(directory / "disk.raw"), "bootindex": 0}]}}}
    run = start_runner(directory, config, "--template-dir", str(templates))
    try:
        wait_until("STOPPED", lambda: (run.runtime / "status.json").exists()
                   and run.status()["state"] == "STOPPED", run, timeout=240)
        assert "mode=poweroff" in run.console.read_text(errors="replace")
        assert run.status()["exit_code"] == 0 and run.status()["cpus"] == 0
        time.sleep(2)
        assert run.proc.poll() is None, "the runner ended although guestShutdownStops is set"
        assert "staying stopped" in run.text()
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(30) == 0
        assert not run.runtime.exists()
    finally:
        stop(run)
        for p in processes("qemu-system-x86_64", str(directory)):
            p.kill()
        shutil.rmtree(directory, ignore_errors=True)


# Section: UEFI


def test_uefi_boot_keeps_its_efi_variables_across_two_runs(guest_dir: Path) -> None:
    """OVMF boots the guest's kernel (the disk images boot with a BIOS only); the guest
    powers itself off; the vars OVMF wrote are what the second run starts with."""
    from vmdriver.host.config import HostConfig
    from vmdriver.host.firmware import find_firmware

    fw = find_firmware("uefi-4m")
    if fw is None or not fw.code.exists():
        pytest.skip("OVMF is not installed")
    directory = tempfile_dir()
    templates = directory / "templates"
    templates.mkdir()
    cmdline = (guest_dir / "cmdline").read_text().strip() + " vmdriver.mode=poweroff"
    (templates / "kernel.j2").write_text(
        '{% extends "standard.j2" %}\n{% block extra_args %}\n'
        f"  - -kernel\n  - {json.dumps(str(guest_dir / 'vmlinuz'))}\n"
        f"  - -initrd\n  - {json.dumps(str(guest_dir / 'initrd.img'))}\n"
        f"  - -append\n  - {json.dumps(cmdline)}\n{{% endblock %}}\n")
    # The kernel is not a drive: the operator's image_paths admit it.
    host = directory / "host.hcl"
    jail = 'jail = "off"\n' if "jail" in HostConfig.model_fields else ""
    host.write_text(f'image_paths = ["{guest_dir.resolve()}"]\n{jail}')
    config = {"/Runner": {
        "dataDir": str(directory / "data"), "runtimeDir": str(directory / "run"), "template": "kernel.j2",
        "vm": {"name": "efi", "firmware": "uefi-4m", "accelerator": "tcg", "cpuModel": "max",
               "maximumRam": "256 MiB", "network": [{"type": "user"}]}}}
    vars_file = directory / "data" / "fw-vars.fd"
    hashes: list[bytes] = []
    try:
        for n in (1, 2):
            before = vars_file.read_bytes() if vars_file.exists() else None
            run = start_runner(directory, config, "--template-dir", str(templates),
                               "--host-config", str(host), log=f"runner{n}.log")
            assert run.proc.wait(300) == 0, run.text()[-1500:]
            assert run.console.read_text(errors="replace").count(READY) == n
            if before is not None:
                assert before == hashes[-1]  # the second run started from the first run's vars
            hashes.append(vars_file.read_bytes())
        assert hashes[0] != fw.vars_template.read_bytes(), "OVMF did not write the VM's vars"
    finally:
        for p in processes("qemu-system-x86_64", str(directory)):
            p.kill()
        shutil.rmtree(directory, ignore_errors=True)
