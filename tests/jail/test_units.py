"""Pure logic of the jail: the argv, uid leases, the required/preferred/off decision."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from vmdriver.errors import HostConfigError, HostError
from vmdriver.jail import ids
from vmdriver.jail.plan import JailSpec, decode_exit, filter_env, wrap_argv
from vmdriver.jail.probe import JailMode, JailSupport, cgroup_layout, decide

QEMU = ("/usr/bin/qemu-system-x86_64", "-S")


def _spec(**kw: object) -> JailSpec:
    base: dict[str, object] = {"uid": 200100, "gid": 200100,
                               "ro_paths": ("/usr/lib/x86_64-linux-gnu", "/usr/bin/qemu-system-x86_64"),
                               "rw_paths": ("/var/lib/vmd/a/task",), "fds": (3, 7)}
    base.update(kw)
    return JailSpec(**base)  # type: ignore[arg-type]


def _pairs(argv: tuple[str, ...], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


class TestWrapArgv:
    def test_chain_order(self) -> None:
        argv = wrap_argv(QEMU, _spec())
        # root's setpriv first, then bwrap, then setpriv arming the death signal, then QEMU.
        assert argv[0] == "/usr/bin/setpriv"
        assert "--reuid=200100" in argv and "--regid=200100" in argv
        assert argv.index("--clear-groups") < argv.index("/usr/bin/bwrap")
        assert argv[-len(QEMU):] == QEMU
        assert argv[-len(QEMU) - 3:-len(QEMU)] == ("/usr/bin/setpriv", "--pdeathsig=KILL", "--")

    def test_no_die_with_parent(self) -> None:
        assert "--die-with-parent" not in wrap_argv(QEMU, _spec())

    def test_namespaces(self) -> None:
        argv = wrap_argv(QEMU, _spec())
        for flag in ("--unshare-user", "--disable-userns", "--unshare-pid", "--unshare-ipc",
                     "--unshare-uts", "--unshare-net", "--as-pid-1", "--new-session", "--clearenv"):
            assert flag in argv, flag
        assert _pairs(argv, "--cap-drop") == ["ALL"]
        assert "--cap-add" not in argv
        assert "--unshare-net" not in wrap_argv(QEMU, _spec(share_net=True))

    def test_mounts(self) -> None:
        argv = wrap_argv(QEMU, _spec(devices=("/dev/kvm",)))
        assert _pairs(argv, "--ro-bind") == ["/usr/bin/qemu-system-x86_64",
                                              "/usr/lib/x86_64-linux-gnu"]
        assert _pairs(argv, "--bind") == ["/var/lib/vmd/a/task"]
        assert "/dev/kvm" in _pairs(argv, "--dev-bind")
        # The private /tmp comes before anything bound beneath it; parents are made passable.
        assert argv.index("--tmpfs") < argv.index("--ro-bind")
        dirs = _pairs(argv, "--dir")
        assert dirs.index("/var/lib/vmd") < dirs.index("/var/lib/vmd/a")
        assert "/var/lib/vmd/a/task" not in dirs
        assert argv[argv.index("--remount-ro") + 1] == "/"

    def test_fds_and_env(self) -> None:
        spec = _spec(block_fd=9, env=filter_env({"LANG": "C", "LD_PRELOAD": "/x.so"})[0])
        argv = wrap_argv(QEMU, spec)
        assert spec.pass_fds == (3, 7, 9)
        assert _pairs(argv, "--block-fd") == ["9"]
        assert _pairs(argv, "--setenv") == ["LANG"]

    def test_without_uid_switch(self) -> None:
        argv = wrap_argv(QEMU, _spec(uid=None, gid=None))
        assert argv[0] == "/usr/bin/bwrap" and "--reuid" not in " ".join(argv)

    def test_setuid_mode(self) -> None:
        argv = wrap_argv(QEMU, _spec(userns=False))
        # Only the real uid changes: bwrap must start with root's capabilities.
        assert "--ruid=200100" in argv and "--reuid=200100" not in argv
        assert "--bounding-set=-all" not in argv
        assert "--unshare-user" not in argv and "--unshare-pid" in argv
        with pytest.raises(ValueError):
            _spec(userns=False, uid=None, gid=None)

    def test_groups(self) -> None:
        argv = wrap_argv(QEMU, _spec(groups=(109,)))
        assert "--groups=109" in argv and "--clear-groups" not in argv

    @pytest.mark.parametrize("bad", [
        {"rw_paths": ("relative/dir",)}, {"ro_paths": ("/a\0b",)}, {"uid": 0},
        {"uid": 200100, "gid": None}, {"chdir": "task"},
    ])
    def test_refuses(self, bad: dict[str, object]) -> None:
        with pytest.raises(ValueError):
            _spec(**bad)

    def test_refuses_relative_program(self) -> None:
        with pytest.raises(ValueError):
            wrap_argv(("qemu-system-x86_64",), _spec())


def test_filter_env() -> None:
    kept, dropped = filter_env({"A": "1", "LD_PRELOAD": "x", "LD_LIBRARY_PATH": "y",
                                "GLIBC_TUNABLES": "z", "TMPDIR": "/", "BAD-NAME": "1",
                                "NUL": "a\0b"})
    assert kept == (("A", "1"),)
    assert set(dropped) == {"LD_PRELOAD", "LD_LIBRARY_PATH", "GLIBC_TUNABLES", "TMPDIR",
                            "BAD-NAME", "NUL"}


def test_decode_exit() -> None:
    assert decode_exit(0) == (0, 0)
    assert decode_exit(1) == (1, 0)
    assert decode_exit(137) == (137, 9)


class TestIds:
    def test_deterministic_and_idempotent(self, tmp_path: Path) -> None:
        a = ids.allocate("vm-1", tmp_path)
        assert ids.allocate("vm-1", tmp_path) == a
        assert ids.DEFAULT_RANGE.first <= a.uid <= ids.DEFAULT_RANGE.last
        ids.release(a)
        assert ids.allocate("vm-1", tmp_path).uid == a.uid

    def test_collision_takes_next(self, tmp_path: Path) -> None:
        small = ids.IdRange(300000, 3)
        got = {ids.allocate(f"vm-{i}", tmp_path, small).uid for i in range(3)}
        assert got == {300000, 300001, 300002}
        with pytest.raises(HostError, match="no free jail uid"):
            ids.allocate("vm-3", tmp_path, small)
        assert len(ids.held(tmp_path)) == 3

    def test_release_only_own(self, tmp_path: Path) -> None:
        a = ids.allocate("vm-a", tmp_path)
        ids.release(ids.IdLease("vm-b", a.uid, a.path))
        assert ids.held(tmp_path) == {a.uid: "vm-a"}
        ids.release(a)
        assert ids.held(tmp_path) == {}

    def test_skips_accounts(self, tmp_path: Path) -> None:
        # uid 1000-range accounts are real on many hosts; 65534 (nobody) is on Debian.
        nobody = ids.IdRange(65534, 1)
        with pytest.raises(HostError):
            ids.allocate("vm", tmp_path, nobody)

    def test_concurrent_allocations_differ(self, tmp_path: Path) -> None:
        small = ids.IdRange(300000, 50)
        got: list[int] = []
        lock = threading.Lock()

        def take(i: int) -> None:
            uid = ids.allocate(f"vm-{i}", tmp_path, small).uid
            with lock:
                got.append(uid)

        threads = [threading.Thread(target=take, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(got)) == 40

    def test_bad_range(self) -> None:
        with pytest.raises(HostConfigError):
            ids.IdRange(0, 10)

    def test_overlaps(self, tmp_path: Path) -> None:
        (tmp_path / "subuid").write_text("alice:100000:65536\nbob:210000:65536\n")
        found = ids.overlaps(ids.DEFAULT_RANGE, tmp_path)
        assert any("210000-275535" in f for f in found)
        assert not any("100000" in f for f in found)

    def test_unwritable_registry(self, tmp_path: Path) -> None:
        blocker = tmp_path / "file"
        blocker.write_text("")
        with pytest.raises(HostError, match="registry"):
            ids.allocate("vm", blocker / "uids")


def _support(**kw: object) -> JailSupport:
    base: dict[str, object] = {"bwrap": "bubblewrap 0.8.0", "setpriv": True, "uid_switch": True,
                               "userns": True, "cgroup": "v2", "seccomp": True, "problems": ()}
    base.update(kw)
    return JailSupport(**base)  # type: ignore[arg-type]


class TestDecide:
    def test_full_support(self) -> None:
        assert decide(JailMode.REQUIRED, _support()) == (True, ())

    def test_off_is_never_silent(self) -> None:
        jail, warnings = decide(JailMode.OFF, _support())
        assert not jail and warnings

    def test_no_userns(self) -> None:
        broken = _support(userns=False, problems=("trial jail failed: No permissions",))
        with pytest.raises(HostError, match="No permissions"):
            decide(JailMode.REQUIRED, broken)
        jail, warnings = decide(JailMode.PREFERRED, broken)
        assert not jail and "unjailed" in warnings[0]

    def test_no_seccomp(self) -> None:
        weak = _support(seccomp=False)
        with pytest.raises(HostError, match="seccomp"):
            decide(JailMode.REQUIRED, weak)
        assert decide(JailMode.PREFERRED, weak) == (True, ("QEMU without seccomp (-sandbox)",))

    def test_hybrid_cgroups_warn(self) -> None:
        jail, warnings = decide(JailMode.REQUIRED, _support(cgroup="hybrid"))
        assert jail and "cgroup hybrid" in warnings[0]

    def test_setuid_fallback(self) -> None:
        fallback = _support(userns=False, setuid_mode=True,
                            problems=("trial jail in a user namespace failed: x",))
        jail, warnings = decide(JailMode.REQUIRED, fallback)
        assert jail and fallback.mode == "setuid" and "setuid mode" in warnings[-1]

    def test_as_dict(self) -> None:
        d = _support(problems=("x",)).as_dict()
        assert d["jail.available"] is True and d["jail.problems"] == "x"


def test_cgroup_layout(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"
                      "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
    assert cgroup_layout(tmp_path, mounts) == "hybrid"
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    assert cgroup_layout(tmp_path, mounts) == "v2"
    assert os.path.exists(mounts)
