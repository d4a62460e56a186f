"""The test guest boots inside the jail: image as an fd, QMP on an inherited socketpair.

One guest for the whole module (a TCG boot takes 6-20 s). It runs with user-mode
networking and a ``hostfwd``, so this jail shares the host's network namespace
(slirp binds the forwarded port in QEMU's own namespace) and nothing else.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import READY
from tests.jail.conftest import QEMU, Jailed, VmDirs, alive, make_vm, processes_of, spawn
from vmdriver.jail import dirs, ids
from vmdriver.jail.probe import SANDBOX_ARG

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("jail_ready")]

BOOT_TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(console: Path, j: Jailed) -> str:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        text = console.read_text(errors="replace") if console.exists() else ""
        for line in text.splitlines():
            if line.startswith(READY):
                return line
        if j.proc.poll() is not None:
            pytest.fail(f"QEMU exited: {j.stderr.read_text(errors='replace')}")
        time.sleep(0.2)
    pytest.fail(f"no {READY} within {BOOT_TIMEOUT} s; console: {text[-500:]}")


@pytest.fixture(scope="module")
def booted(guest_dir: Path) -> Iterator[tuple[Jailed, VmDirs, int, str]]:
    """The jailed, booted guest, its dirs and lease, the forwarded port, its readiness line."""
    state = Path(tempfile.mkdtemp(prefix="vmdj-", dir="/tmp"))
    vm = make_vm(state, "booted", ro_paths=(str(guest_dir),), share_net=True)
    port = _free_port()
    console = vm.run / "console.log"
    image = os.open(guest_dir / "disk.raw", os.O_RDONLY | os.O_CLOEXEC)
    argv = (QEMU, "-machine", "pc,accel=tcg", "-m", "256", "-display", "none",
            "-nodefaults", "-no-user-config", "-sandbox", SANDBOX_ARG,
            "-kernel", str(guest_dir / "vmlinux"), "-initrd", str(guest_dir / "initrd.img"),
            "-append", (guest_dir / "cmdline").read_text().strip(),
            "-chardev", f"file,id=ser,path={console}", "-serial", "chardev:ser",
            "-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:8080",
            "-add-fd", f"fd={image},set=1",
            "-drive", "file=/dev/fdset/1,format=raw,if=virtio,readonly=on")
    try:
        j = spawn(argv, vm.spec, state, extra_fds=(image,))
    finally:
        os.close(image)
    try:
        line = _wait_ready(console, j)
        yield j, vm, port, line
    finally:
        j.kill()
        # SIGKILL is asynchronous: give the kernel a moment to take the processes down.
        deadline = time.monotonic() + 10
        while (leftover := processes_of(vm.lease.uid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        dirs.release(vm.spec)
        ids.release(vm.lease)
        import shutil
        shutil.rmtree(state, ignore_errors=True)
        assert not leftover, f"processes left as the VM's uid: {leftover}"


def test_boots_and_answers_qmp(booted: tuple[Jailed, VmDirs, int, str]) -> None:
    j, _, _, line = booted
    assert "mode=normal" in line
    assert b'"QMP"' in j.read_greeting()
    assert j.command("qmp_capabilities") == {"return": {}}
    status = j.command("query-status")["return"]
    assert isinstance(status, dict) and status["status"] == "running"
    # The disk came in as an fd: QEMU knows it only as its fdset.
    assert "/dev/fdset/1" in str(j.command("query-block"))


def test_guest_serves_http_through_hostfwd(booted: tuple[Jailed, VmDirs, int, str]) -> None:
    _, _, port, _ = booted
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as resp:
        assert "vmdriver-test-guest" in resp.read().decode()


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def test_runs_as_vm_uid_without_privileges(booted: tuple[Jailed, VmDirs, int, str]) -> None:
    j, vm, _, _ = booted
    st = _status(j.qemu_pid)
    uid = str(vm.lease.uid)
    assert st["Uid"].split() == [uid] * 4
    assert st["Gid"].split() == [uid] * 4
    assert st["Groups"] == ""
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[caps], 16) == 0, caps
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"  # QEMU's -sandbox filter is active
    # The tracked pid (bwrap's monitor) is unprivileged too.
    mon = _status(j.proc.pid)
    assert mon["Uid"].split() == [uid] * 4 and int(mon["CapEff"], 16) == 0


def test_own_namespaces(booted: tuple[Jailed, VmDirs, int, str]) -> None:
    j, _, _, _ = booted
    for ns in ("mnt", "pid", "ipc", "uts", "user", "cgroup"):
        assert os.readlink(f"/proc/{j.qemu_pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    # hostfwd needs the host's network namespace; nothing else is shared.
    assert os.readlink(f"/proc/{j.qemu_pid}/ns/net") == os.readlink("/proc/self/ns/net")
    # QEMU is pid 1 of its pid namespace.
    assert _status(j.qemu_pid)["NSpid"].split()[-1] == "1"


def test_only_its_own_files_exist(booted: tuple[Jailed, VmDirs, int, str], guest_dir: Path) -> None:
    j, vm, _, _ = booted
    root = Path(f"/proc/{j.qemu_pid}/root")
    top = {p.name for p in root.iterdir()}
    assert top <= {"usr", "lib", "lib64", "bin", "sbin", "dev", "tmp", "var"}, top
    assert not (root / "etc").exists() and not (root / "root").exists()
    assert {p.name for p in (root / "usr/bin").iterdir()} == {"qemu-system-x86_64", "setpriv"}
    assert {p.name for p in (root / "dev").iterdir()} == {"full", "null", "random", "urandom",
                                                           "zero"}
    # Of the host's state dir, only this VM's own run dir; of the guest dir, read-only.
    assert [p.name for p in (root / vm.run.relative_to("/")).parent.iterdir()] == ["run"]
    assert (root / vm.run.relative_to("/") / "console.log").exists()
    with pytest.raises(OSError):
        (root / guest_dir.relative_to("/") / "x").write_text("")
    assert alive(j.qemu_pid)
