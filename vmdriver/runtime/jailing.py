"""Putting a VM's QEMU in its jail (:mod:`vmdriver.jail`): which uid, which paths, which devices.

QEMU sees only what its job was given: the emulator and its libraries and
firmware, the operator's image dirs and the artifact cache (read-only, where
policy lets images and backing files come from), its own task dir and socket
dir and data dir (read-write), and the allocation's shared dir (read-only: tasks
of one allocation run as different uids). Images, taps, logs and QMP arrive as
fds. The VM record stays outside, where the VM's uid cannot rewrite it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from vmdriver.host.config import HostConfig
from vmdriver.jail import dirs as jail_dirs
from vmdriver.jail import ids
from vmdriver.jail.paths import qemu_ro_paths
from vmdriver.jail.plan import SETPRIV, JailSpec
from vmdriver.jail.probe import JailMode, decide, probe
from vmdriver.runtime.prepare import Prepared
from vmdriver.runtime.taskdir import VMDirs
from vmdriver.spec import RbdMedium, UserNic

log = logging.getLogger(__name__)


class JailRecord(BaseModel):
    """What releasing a jail after a re-attach needs (kept in the VM record)."""

    model_config = ConfigDict(frozen=True)

    uid: int
    lease: str
    rw_paths: list[str]
    ro_paths: list[str]
    devices: list[str]

    def spec(self) -> JailSpec:
        """The jail as far as releasing it goes."""
        return JailSpec(uid=self.uid, gid=self.uid, ro_paths=tuple(self.ro_paths),
                        rw_paths=tuple(self.rw_paths), devices=tuple(self.devices))


@dataclass(frozen=True)
class Jail:
    """A VM's jail: the spec QEMU is wrapped in, and its uid lease."""

    spec: JailSpec
    lease: ids.IdLease

    def record(self) -> JailRecord:
        """For the VM record."""
        s = self.spec
        assert s.uid is not None
        return JailRecord(uid=s.uid, lease=str(self.lease.path), rw_paths=list(s.rw_paths),
                          ro_paths=list(s.ro_paths), devices=list(s.devices))


def plan_jail(host: HostConfig, vm_id: str, prep: Prepared, dirs: VMDirs,
              extra_ro: tuple[str, ...] = ()) -> tuple[Jail | None, tuple[str, ...]]:
    """The VM's jail, or ``None`` where the host config or the host rules it out; warnings.

    Raises HostError where ``jail = "required"`` and this host cannot build one.
    """
    enabled, warnings = decide(JailMode(host.jail), probe(str(prep.ctx.binary)))
    if not enabled:
        return None, warnings
    lease = ids.allocate(vm_id, host.state_dir / "jail" / "uids")
    try:
        spec = _spec(host, prep, dirs, lease.uid, extra_ro)
        jail_dirs.prepare_dirs(spec, control=(dirs.record, dirs.runtime))
    except BaseException:
        ids.release(lease)
        raise
    return Jail(spec, lease), warnings


def _spec(host: HostConfig, prep: Prepared, dirs: VMDirs, uid: int,
          extra_ro: tuple[str, ...]) -> JailSpec:
    spec = prep.spec
    ro = [*qemu_ro_paths(str(prep.ctx.binary), (SETPRIV,)), *host.image_paths, *extra_ro,
          str(host.state_dir / "cache"), str(host.state_dir / "snapshots"), str(dirs.task.shared)]
    if spec.firmware.code:
        ro.append(spec.firmware.code)
    rw = [str(dirs.task.path), str(dirs.sockets), str(dirs.data)]
    for share in spec.shares:
        (ro if share.read_only else rw).append(prep.ctx.share_paths[share.tag])
    # slirp binds forwarded ports (and reaches out) in QEMU's own network namespace;
    # QEMU's default NIC (no NICs given) is a user-mode one too.
    share_net = not spec.nics or any(isinstance(n, UserNic) for n in spec.nics)
    # Ceph's monitors and OSDs are reached from QEMU itself.
    share_net = share_net or any(isinstance(d.medium, RbdMedium) for d in spec.drives)
    devices = ("/dev/kvm",) if prep.ctx.accelerator == "kvm" else ()
    return JailSpec(uid=uid, gid=uid, ro_paths=tuple(p for p in ro if os.path.exists(p)),
                    rw_paths=tuple(rw), devices=devices, share_net=share_net,
                    chdir=str(dirs.task.path))


def release(jail: Jail | JailRecord) -> None:
    """Hand the VM's dirs back and free its uid (after QEMU has exited)."""
    if isinstance(jail, Jail):
        spec, lease_path, uid = jail.spec, jail.lease.path, jail.lease.uid
    else:
        spec, lease_path, uid = jail.spec(), Path(jail.lease), jail.uid
    try:
        jail_dirs.release(spec)
    except OSError as exc:
        log.warning("jail of uid %d: cannot hand its dirs back: %s", uid, exc)
    ids.release(ids.IdLease(vm_id="", uid=uid, path=lease_path))
