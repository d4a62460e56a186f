"""Host side of the jail, on real files: hand-over of dirs and ACLs, and the probe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.jail.conftest import QEMU
from vmdriver.jail import dirs
from vmdriver.jail.plan import JailSpec
from vmdriver.jail.probe import JailMode, clear_cache, decide, probe

UID = 264000


@pytest.fixture
def root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("chown and ACLs on others' behalf need root")


def _spec(tmp: Path, **kw: object) -> JailSpec:
    return JailSpec(uid=UID, gid=UID, rw_paths=(str(tmp / "state/vm/run"),), **kw)  # type: ignore[arg-type]


@pytest.mark.usefixtures("root_only")
def test_prepare_and_release(tmp_path: Path) -> None:
    state = tmp_path / "state"
    run = state / "vm" / "run"
    (run / "sub").mkdir(parents=True)
    state.chmod(0o700)
    (state / "vm").chmod(0o700)
    (run / "sub" / "f").write_text("x")
    host_file = tmp_path / "host-file"
    host_file.write_text("host")
    os.link(host_file, run / "hardlink")          # planted hard link to a host file
    os.symlink("/etc/passwd", run / "symlink")    # planted symlink
    spec = _spec(tmp_path)

    dirs.prepare_dirs(spec)
    assert (run / "sub" / "f").stat().st_uid == UID
    assert run.stat().st_uid == UID
    assert host_file.stat().st_uid == 0, "a hard-linked host file was handed over"
    assert Path("/etc/passwd").stat().st_uid == 0
    assert (run / "symlink").lstat().st_uid == UID
    # The 0700 parents got a search-only entry for the VM's uid, nothing more.
    for parent in (state, state / "vm"):
        assert dirs._can(str(parent), UID, (UID,), 1)
        assert not dirs._can(str(parent), UID, (UID,), 4)
    assert not dirs._can(str(tmp_path / "state"), UID + 1, (UID + 1,), 1)

    dirs.release(spec)
    assert (run / "sub" / "f").stat().st_uid == 0
    for parent in (state, state / "vm"):
        assert not dirs._can(str(parent), UID, (UID,), 1)
        assert oct(parent.stat().st_mode & 0o777) == "0o700"
        with pytest.raises(OSError):
            os.getxattr(parent, "system.posix_acl_access")


@pytest.mark.usefixtures("root_only")
def test_grant_keeps_existing_entries(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir(mode=0o750)
    d.chmod(0o750)
    dirs.grant(str(d), UID, 1)
    dirs.grant(str(d), UID + 1, 1)
    dirs.revoke(str(d), UID)
    assert not dirs._can(str(d), UID, (), 1)
    assert dirs._can(str(d), UID + 1, (), 1)
    dirs.revoke(str(d), UID + 1)
    assert oct(d.stat().st_mode & 0o777) == "0o750"


@pytest.mark.usefixtures("root_only")
def test_prepare_missing_dir_is_a_host_error(tmp_path: Path) -> None:
    from vmdriver.errors import HostError
    with pytest.raises(HostError, match="cannot hand"):
        dirs.prepare_dirs(_spec(tmp_path))


def test_probe_this_host() -> None:
    clear_cache()
    support = probe(QEMU)
    d = support.as_dict()
    assert set(d) >= {"jail.available", "jail.bwrap", "jail.userns", "jail.cgroup", "jail.seccomp"}
    if not support.available:
        pytest.skip(f"no jail on this host: {support.problems}")
    assert support.bwrap and support.bwrap.startswith("bubblewrap")
    assert support.seccomp is True
    assert decide(JailMode.PREFERRED, support)[0] is True


def test_probe_without_bwrap(tmp_path: Path) -> None:
    support = probe(None, bwrap=str(tmp_path / "no-bwrap"))
    assert not support.available
    assert any("no-bwrap" in p for p in support.problems)
    with pytest.raises(Exception, match="no-bwrap"):
        decide(JailMode.REQUIRED, support)


def test_control_plane_stays_out(tmp_path: Path) -> None:
    from vmdriver.errors import HostError
    spec = _spec(tmp_path)
    run = tmp_path / "state/vm/run"
    with pytest.raises(HostError, match=r"record\.json"):
        dirs.check_control_plane(spec, (run / "record.json",))
    with pytest.raises(HostError):
        dirs.prepare_dirs(spec, control=(run,))
    # Beside the writable dir is fine: the record one level up, in a root-only dir.
    dirs.check_control_plane(spec, (tmp_path / "state/vm/record.json", tmp_path / "state/vm/runx"))
