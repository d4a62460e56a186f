"""A jailed QEMU given deliberately permissive arguments reaches nothing of the host.

Each test starts QEMU with ``-machine none -S`` (no guest, ~50 ms) through
:func:`wrap_argv`, spawned as the runtime spawns it. The arguments are ones the
argument policy would refuse; here nothing checks them, so only the jail stands
between them and the host.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.jail.conftest import IDLE, Jailed, alive, make_vm, processes_of, spawn
from vmdriver.jail import dirs, ids
from vmdriver.jail.plan import catches, filter_env

pytestmark = pytest.mark.usefixtures("jail_ready")


@pytest.fixture
def secret() -> Iterator[Path]:
    """A root-only file planted outside every jail."""
    path = Path("/root") / f"vmdriver-jail-secret-{secrets.token_hex(4)}"
    path.write_bytes(b"top secret\n" * 100)
    path.chmod(0o600)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _fails(j: Jailed, needle: str) -> str:
    """Wait for a jailed QEMU that must refuse to start; its stderr."""
    code = j.proc.wait(timeout=30)
    j.qmp.close()
    err = j.stderr.read_text(errors="replace")
    assert code != 0, f"QEMU started: {err}"
    assert needle in err, err
    assert not alive(j.qemu_pid)
    return err


@pytest.mark.parametrize("userns", [True, False], ids=["userns", "setuid-mode"])
@pytest.mark.parametrize("target", ["secret", "/etc/shadow"])
def test_host_file_cannot_be_read(state: Path, secret: Path, target: str, userns: bool) -> None:
    path = str(secret) if target == "secret" else target
    vm = make_vm(state, "reader", userns=userns)
    drive = ("-drive", f"file={path},format=raw,if=none,readonly=on")
    j = spawn((*IDLE, *drive), vm.spec, state)
    err = _fails(j, "Could not open")
    # Not "Permission denied" from DAC: the file does not exist in QEMU's world.
    assert "No such file or directory" in err
    # The same option on a file that is inside the jail works: the jail, not the
    # argument, stopped it.
    inside = vm.run / "copy.img"
    inside.write_bytes(secret.read_bytes())
    os.chown(inside, vm.lease.uid, vm.lease.gid)
    ok = spawn((*IDLE, "-drive", f"file={inside},format=raw,if=none,readonly=on"),
               vm.spec, state)
    try:
        assert b'"QMP"' in ok.read_greeting()
        ok.command("qmp_capabilities")
        assert str(inside) in str(ok.command("query-block"))
    finally:
        ok.kill()


def test_host_dir_cannot_be_written(state: Path) -> None:
    # World-writable on the host, so only the mount namespace can keep QEMU's uid out.
    outside = Path(f"/tmp/vmdj-outside-{secrets.token_hex(4)}")
    outside.mkdir(mode=0o777)
    outside.chmod(0o777)
    try:
        vm = make_vm(state, "writer")
        j = spawn((*IDLE, "-chardev", f"file,id=c,path={outside}/x"), vm.spec, state)
        _fails(j, "No such file or directory")
        assert not (outside / "x").exists()
        # The jail's root is read-only: nothing can be created beside the binds.
        _fails(spawn((*IDLE, "-chardev", "file,id=c,path=/x"), vm.spec, state),
               "Read-only file system")
        # /tmp itself is the jail's own tmpfs: QEMU writes there and the host never sees it.
        name = f"vmdj-tmp-{secrets.token_hex(4)}"
        j = spawn((*IDLE, "-chardev", f"file,id=c,path=/tmp/{name}"), vm.spec, state)
        try:
            assert b'"QMP"' in j.read_greeting()
            assert Path(f"/proc/{j.qemu_pid}/root/tmp/{name}").exists()
            assert not Path(f"/tmp/{name}").exists()
        finally:
            j.kill()
    finally:
        for p in outside.iterdir():
            p.unlink()
        outside.rmdir()


def test_image_reaches_qemu_only_as_an_fd(state: Path, secret: Path) -> None:
    # The supervisor opens the file (here: a root-only one); QEMU reads it through the fd.
    vm = make_vm(state, "fdimage")
    fd = os.open(secret, os.O_RDONLY | os.O_CLOEXEC)
    try:
        j = spawn((*IDLE, "-add-fd", f"fd={fd},set=1",
                   "-drive", "file=/dev/fdset/1,format=raw,if=none,readonly=on,id=d0"),
                  vm.spec, state, extra_fds=(fd,))
    finally:
        os.close(fd)
    try:
        assert b'"QMP"' in j.read_greeting(), j.stderr.read_text()
        j.command("qmp_capabilities")
        assert "/dev/fdset/1" in str(j.command("query-block"))
    finally:
        j.kill()


@pytest.mark.parametrize("userns", [True, False], ids=["userns", "setuid-mode"])
def test_kill_tracked_pid_leaves_nothing(state: Path, userns: bool) -> None:
    vm = make_vm(state, "killed", userns=userns)
    j = spawn(IDLE, vm.spec, state)
    assert b'"QMP"' in j.read_greeting()
    status = Path(f"/proc/{j.qemu_pid}/status").read_text()
    assert f"Uid:\t{vm.lease.uid}\t{vm.lease.uid}\t{vm.lease.uid}\t{vm.lease.uid}" in status
    assert "CapEff:\t0000000000000000" in status and "CapBnd:\t0000000000000000" in status
    assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status
    same_userns = os.readlink(f"/proc/{j.qemu_pid}/ns/user") == os.readlink("/proc/self/ns/user")
    assert same_userns is not userns
    # The tracked pid is bwrap's monitor; QEMU is its only child, and nothing else
    # runs as the VM's uid.
    assert sorted(processes_of(vm.lease.uid)) == sorted([j.proc.pid, j.qemu_pid])
    assert os.readlink(f"/proc/{j.qemu_pid}/exe").endswith("qemu-system-x86_64")
    j.kill()
    assert not alive(j.qemu_pid)
    assert processes_of(vm.lease.uid) == []


def test_qemu_exit_ends_tracked_pid(state: Path) -> None:
    vm = make_vm(state, "quitter")
    j = spawn(IDLE, vm.spec, state)
    j.read_greeting()
    # QEMU is its pid namespace's init: SIGTERM reaches it once its handler is in.
    deadline = time.monotonic() + 5
    while not catches(j.qemu_pid, signal.SIGTERM) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not catches(j.qemu_pid, signal.SIGQUIT)
    # A graceful signal goes to QEMU itself; its clean exit ends the monitor with status 0.
    os.kill(j.qemu_pid, signal.SIGTERM)
    assert j.proc.wait(timeout=10) == 0
    assert "terminating on signal 15" in j.stderr.read_text()
    assert processes_of(vm.lease.uid) == []
    j.qmp.close()


_SUPERVISOR = """
import sys, subprocess
from tests.jail.conftest import IDLE
from vmdriver.jail.plan import JailSpec, wrap_argv, LAUNCH_ENV
import json
spec = JailSpec(**json.loads(sys.argv[1]))
p = subprocess.Popen(wrap_argv(IDLE, spec), env=dict(LAUNCH_ENV), stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0)
print(p.pid, flush=True)
sys.stdin.read()
"""


def test_vm_survives_supervisor_kill(state: Path) -> None:
    """No --die-with-parent: a kill -9'd supervisor leaves its VMs running for re-attach."""
    import json
    vm = make_vm(state, "orphan")
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in vm.spec.__dict__.items()}
    sup = subprocess.Popen((sys.executable, "-c", _SUPERVISOR, json.dumps(fields)),
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           cwd=Path(__file__).parents[2])
    assert sup.stdout is not None
    tracked = int(sup.stdout.readline())
    try:
        time.sleep(0.5)
        sup.kill()
        sup.wait()
        sup.stdout.close()
        assert sup.stdin is not None
        sup.stdin.close()
        time.sleep(0.5)
        assert alive(tracked)
        assert len(processes_of(vm.lease.uid)) == 2
    finally:
        os.kill(tracked, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while processes_of(vm.lease.uid) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert processes_of(vm.lease.uid) == []


def test_two_vms_run_as_two_uids(state: Path) -> None:
    a, b = make_vm(state, "vm-a"), make_vm(state, "vm-b")
    assert a.lease.uid != b.lease.uid
    ja, jb = spawn(IDLE, a.spec, state), spawn(IDLE, b.spec, state)
    try:
        ja.read_greeting()
        jb.read_greeting()
        uids = {Path(f"/proc/{j.qemu_pid}/status").read_text().split("Uid:")[1].split()[0]
                for j in (ja, jb)}
        assert uids == {str(a.lease.uid), str(b.lease.uid)}
        # Each in its own network namespace (no user networking asked for), not the host's.
        nets = {os.readlink(f"/proc/{j.qemu_pid}/ns/net") for j in (ja, jb)}
        assert len(nets) == 2 and os.readlink("/proc/self/ns/net") not in nets
    finally:
        ja.kill()
        jb.kill()
    ids.release(a.lease)
    ids.release(b.lease)
    assert ids.held(state / "uids") == {}


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")
def test_kvm_only_when_handed_over(state: Path) -> None:
    """/dev/kvm exists in the jail only if asked for; then the VM's uid may open it."""
    kvm = (*IDLE[:4], "-accel", "kvm", *IDLE[4:])
    vm = make_vm(state, "nokvm")
    _fails(spawn(kvm, vm.spec, state), "Could not access KVM kernel module: No such file")
    vm = make_vm(state, "kvm", devices=("/dev/kvm",))
    j = spawn(kvm, vm.spec, state)
    try:
        assert b'"QMP"' in j.read_greeting(), j.stderr.read_text()
        j.command("qmp_capabilities")
        assert j.command("query-kvm")["return"] == {"enabled": True, "present": True}
    finally:
        j.kill()
        dirs.release(vm.spec)
    assert not dirs._can("/dev/kvm", vm.lease.uid, (), 6)


def test_environment_is_only_what_was_passed(state: Path) -> None:
    vm = make_vm(state, "env")
    env, dropped = filter_env({"VMD_TEST": "yes", "LD_PRELOAD": "/x.so", "TMPDIR": "/"})
    assert set(dropped) == {"LD_PRELOAD", "TMPDIR"}
    j = spawn(IDLE, dataclasses.replace(vm.spec, env=env), state)
    try:
        j.read_greeting()
        environ = Path(f"/proc/{j.qemu_pid}/environ").read_bytes().split(b"\0")
        names = {e.split(b"=", 1)[0] for e in environ if e}
        # bwrap adds PWD; nothing of the supervisor's environment gets in.
        assert names == {b"VMD_TEST", b"PWD"}
        # A session of its own: no controlling terminal of the supervisor to inject into.
        assert int(Path(f"/proc/{j.qemu_pid}/stat").read_text().split(") ")[1].split()[3]) \
            == j.qemu_pid
    finally:
        j.kill()
