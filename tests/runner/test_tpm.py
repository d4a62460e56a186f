"""swtpm as the runner will run it: set-up, readiness with a timeout, a real QEMU whose guest
sees /dev/tpm0, and swtpm ending with QEMU (--terminate), even when QEMU is SIGKILLed."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmdriver.errors import LaunchError
from vmdriver.runner import tpm

READY = "VMDRIVER-GUEST-READY"

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None or shutil.which("swtpm_setup") is None,
                                reason="swtpm/swtpm_setup not installed (Debian: swtpm swtpm-tools)")


def tpm_args(sock: Path) -> tuple[str, ...]:
    """What the qemu layer will render for a spec with a TPM (VM-Operator's ids)."""
    return ("-chardev", f"socket,id=chrtpm,path={sock}", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", "tpm-tis,tpmdev=tpm0")


def start_swtpm(data: Path, sock: Path) -> tuple[subprocess.Popen[bytes], float]:
    data.mkdir(exist_ok=True)
    state = tpm.prepare_state_dir(data)
    proc = subprocess.Popen(tpm.swtpm_argv(state, sock), stderr=subprocess.PIPE)
    waited = asyncio.run(tpm.wait_ready(sock, lambda: proc.poll() is None, timeout=10))
    return proc, waited


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test started; killed at the end whatever happened."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()
        if p.stderr:
            p.stderr.close()


def test_argv() -> None:
    argv = tpm.swtpm_argv(Path("/d/tpm"), Path("/r/swtpm-sock"))
    assert argv == ("swtpm", "socket", "--tpm2", "--tpmstate", "dir=/d/tpm,mode=0600",
                    "--ctrl", "type=unixio,path=/r/swtpm-sock,mode=0600", "--terminate",
                    "--log", "level=1")
    assert tpm.swtpm_setup_argv(Path("/d/tpm"))[:4] == ("swtpm_setup", "--tpm2", "--tpmstate", "/d/tpm")


def test_vm_operator_state_moves_into_tpm_dir(tmp_path: Path) -> None:
    (tmp_path / tpm.STATE_FILE).write_bytes(b"state")
    state = tpm.prepare_state_dir(tmp_path)
    assert (state / tpm.STATE_FILE).read_bytes() == b"state"
    assert not (tmp_path / tpm.STATE_FILE).exists() and not tpm.needs_setup(state)
    assert state.stat().st_mode & 0o777 == 0o700


def test_wait_ready_times_out_and_notices_exit(tmp_path: Path) -> None:
    sock = tmp_path / "swtpm-sock"
    start = time.monotonic()
    with pytest.raises(LaunchError, match=r"did not create .*swtpm-sock within 0.3 s"):
        asyncio.run(tpm.wait_ready(sock, lambda: True, timeout=0.3))
    assert time.monotonic() - start < 2
    # A swtpm that cannot start (no dir for its socket) fails at once, not after the timeout.
    bad = tmp_path / "missing" / "swtpm-sock"
    proc = subprocess.Popen(tpm.swtpm_argv(tmp_path, bad), stderr=subprocess.DEVNULL)
    start = time.monotonic()
    try:
        with pytest.raises(LaunchError, match="swtpm exited before it created"):
            asyncio.run(tpm.wait_ready(bad, lambda: proc.poll() is None, timeout=30))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert time.monotonic() - start < 10


def test_stale_socket_is_removed(tmp_path: Path) -> None:
    sock = tmp_path / "swtpm-sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()  # bound, never listening: what a killed swtpm leaves
    assert not tpm.socket_ready(sock)
    tpm.remove_stale_socket(sock)
    assert not sock.exists()


def test_swtpm_ends_when_qemu_is_killed(state_dir: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    swtpm, _ = start_swtpm(state_dir / "data", state_dir / "swtpm-sock")
    procs.append(swtpm)
    qemu = subprocess.Popen(("qemu-system-x86_64", "-S", "-machine", "pc,accel=tcg", "-nodefaults",
                             "-display", "none", *tpm_args(state_dir / "swtpm-sock")),
                            stderr=subprocess.PIPE)
    procs.append(qemu)
    time.sleep(1.0)  # QEMU connects to swtpm while it sets the machine up
    assert qemu.poll() is None, qemu.stderr.read().decode() if qemu.stderr else ""
    qemu.kill()
    qemu.wait()
    assert wait_exit(swtpm, 5) is not None, "swtpm outlived a SIGKILLed QEMU"


# Section: a booted guest with a TPM


def qmp(path: Path, *commands: dict[str, Any]) -> list[Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        f = s.makefile("rw")
        json.loads(f.readline())  # greeting
        out = []
        for cmd in ({"execute": "qmp_capabilities"}, *commands):
            f.write(json.dumps(cmd) + "\n")
            f.flush()
            while "event" in (reply := json.loads(f.readline())):
                pass
            out.append(reply.get("return", reply))
        return out[1:]


def qga(path: Path, *commands: dict[str, Any]) -> list[Any]:
    """Guest agent commands, after a guest-sync that skips stale replies."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(path))
        f = s.makefile("rw")
        f.write(json.dumps({"execute": "guest-sync", "arguments": {"id": 4711}}) + "\n")
        f.flush()
        while json.loads(f.readline()).get("return") != 4711:
            pass
        out = []
        for cmd in commands:
            f.write(json.dumps(cmd) + "\n")
            f.flush()
            out.append(json.loads(f.readline()))
        return out


def guest_read(path: Path, file: str) -> str:
    opened = qga(path, {"execute": "guest-file-open", "arguments": {"path": file, "mode": "r"}})[0]
    assert "return" in opened, f"guest cannot open {file}: {opened}"
    handle = opened["return"]
    read, _ = qga(path, {"execute": "guest-file-read", "arguments": {"handle": handle, "count": 256}},
                  {"execute": "guest-file-close", "arguments": {"handle": handle}})
    return base64.b64decode(read["return"]["buf-b64"]).decode()


def wait_console(log: Path, qemu: subprocess.Popen[bytes], timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if READY in text:
            return text
        assert qemu.poll() is None, f"QEMU exited: {qemu.stderr.read().decode() if qemu.stderr else ''}"
        time.sleep(0.2)
    raise AssertionError(f"no readiness line within {timeout} s: {log.read_text()[-500:]}")


@pytest.mark.e2e
def test_guest_sees_tpm(guest_dir: Path, state_dir: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    data, sock = state_dir / "data", state_dir / "swtpm-sock"
    data.mkdir()
    state = tpm.prepare_state_dir(data)
    assert tpm.needs_setup(state)
    subprocess.run(tpm.swtpm_setup_argv(state), check=True, capture_output=True)
    assert not tpm.needs_setup(state)
    manufactured = hashlib.sha256((state / tpm.STATE_FILE).read_bytes()).hexdigest()

    swtpm, waited = start_swtpm(data, sock)
    procs.append(swtpm)
    assert waited < 5
    qmp_sock, qga_sock, console = state_dir / "qmp.sock", state_dir / "qga.sock", state_dir / "console.log"
    qemu = subprocess.Popen((
        "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "256", "-nodefaults", "-display", "none",
        # vmlinuz, not the PVH vmlinux: a PVH boot under this QEMU has no ACPI ("PnP ACPI:
        # disabled"), and tpm_tis finds the TPM through ACPI (MSFT0101).
        "-kernel", str(guest_dir / "vmlinuz"), "-initrd", str(guest_dir / "initrd.img"),
        "-append", (guest_dir / "cmdline").read_text().strip(), "-nic", "none",
        "-serial", f"file:{console}",
        "-chardev", f"socket,id=qmp,path={qmp_sock},server=on,wait=off", "-mon", "chardev=qmp,mode=control",
        "-chardev", f"socket,id=qga,path={qga_sock},server=on,wait=off", "-device", "virtio-serial",
        "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
        *tpm_args(sock)), stderr=subprocess.PIPE)
    procs.append(qemu)
    wait_console(console, qemu)

    # The guest's kernel (tpm_tis is built into Debian's) found a TPM 2.0 and made /dev/tpm0.
    assert guest_read(qga_sock, "/sys/class/tpm/tpm0/tpm_version_major").strip() == "2"
    opened = qga(qga_sock, {"execute": "guest-file-open", "arguments": {"path": "/dev/tpm0", "mode": "r"}})
    assert "return" in opened[0], opened
    qga(qga_sock, {"execute": "guest-file-close", "arguments": {"handle": opened[0]["return"]}})
    [tpms] = qmp(qmp_sock, {"execute": "query-tpm"})
    assert [(t["id"], t["model"], t["options"]["type"]) for t in tpms] == [("tpm0", "tpm-tis", "emulator")]

    # Power off: QEMU exits, and swtpm ends with it (--terminate) having saved its state.
    qmp(qmp_sock, {"execute": "system_powerdown"})
    assert wait_exit(qemu, 60) == 0
    assert wait_exit(swtpm, 5) is not None, "swtpm outlived QEMU"
    after = hashlib.sha256((state / tpm.STATE_FILE).read_bytes()).hexdigest()
    assert after != manufactured, "swtpm never wrote the guest's TPM state"
    assert not sock.exists() or not tpm.socket_ready(sock)
