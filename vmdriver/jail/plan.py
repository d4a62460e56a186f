"""What a jailed QEMU may see and be, and the argv that puts it there.

A :class:`JailSpec` is the whole jail of one process: its uid/gid, the paths
that exist inside (read-only or read-write), the devices it may open, the fds
it inherits, and whether it shares the host's network namespace.
:func:`wrap_argv` turns it into an argv around QEMU's own, unchanged one;
the whole chain runs as the VM's uid::

    setpriv --reuid=U --regid=U --clear-groups --inh-caps=-all --bounding-set=-all
        --no-new-privs -- bwrap --unshare-user --disable-userns ... -- setpriv --pdeathsig=KILL -- qemu

The outer ``setpriv`` (root supervisor only) drops to the VM's uid/gid with
no capabilities, no supplementary groups (except those asked for, e.g.
``kvm``) and ``no_new_privs`` *before* bwrap runs; bwrap then builds its
namespaces unprivileged, in a user namespace that maps the VM's uid to itself
and that QEMU cannot nest (``--disable-userns``). QEMU is an ordinary
unprivileged host uid with no capabilities in any namespace. Not used: bwrap
as root without a user namespace (its monitor then stays uid 0 without
CAP_KILL, so the parent-death signal below could not reach QEMU's uid), and
bwrap's ``--uid`` as root (it maps the chosen uid to host uid 0, leaving
root-owned files readable).

Where unprivileged user namespaces are off, a root supervisor uses bwrap's
setuid mode instead (``JailSpec.userns = False``): the outer setpriv changes
only the *real* uid, bwrap sees ruid != euid 0, builds the namespaces with
root's capabilities and switches every process to the real uid before
executing anything. QEMU then runs in the host's user namespace, same uid,
same lack of capabilities; QEMU's ``-sandbox spawn=deny`` forbids it
``unshare``/``setns`` there.

Because bwrap resolves bind sources as the VM's
uid, :func:`vmdriver.jail.dirs.prepare_dirs` grants that uid search
permission on their parent dirs (a POSIX ACL entry, removed by ``release``);
inside the jail no host path exists, so the grant reaches nothing.

**Which pid the runtime tracks.** bwrap always stays behind as a monitor
process: the pid the runtime spawns (and records with its start time) is that
monitor's, and QEMU is its only child, pid 1 of a fresh pid namespace
(``--as-pid-1``). The chain is tied both ways without ``--die-with-parent``
(which would also kill the *monitor* when the supervisor dies, and VMs must
survive a ``kill -9`` of the supervisor for re-attach):

* QEMU exits -> the pid namespace ends -> the monitor exits with QEMU's status
  (``128 + signal`` if QEMU was killed, see :func:`decode_exit`);
* the monitor is killed -> QEMU gets SIGKILL: ``setpriv --pdeathsig KILL``
  arms the parent-death signal right before QEMU is executed, and QEMU's parent
  is the monitor, not the supervisor.

So SIGKILL to the tracked pid ends the VM. A *graceful* signal (SIGTERM, a
job's ``kill_signal``) must go to QEMU itself (:func:`jailed_pid`): the monitor
would die of it and take QEMU down with SIGKILL. As the init of its pid
namespace, QEMU only receives signals it has a handler for (SIGKILL always):
QEMU installs its SIGTERM/SIGINT/SIGHUP handlers a few ms *after* the QMP
greeting, and has none for e.g. SIGQUIT, whose default action would have
killed an unjailed QEMU. :func:`catches` tells whether a signal will arrive;
where it will not, go straight to the next step of the stop ladder.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

#: Where the tools are on Debian; the probe checks they run.
BWRAP = "/usr/bin/bwrap"
SETPRIV = "/usr/bin/setpriv"

#: The environment the jail's first process (root's setpriv) is started with:
#: nothing a job wrote may reach a root process before the jail exists.
LAUNCH_ENV: Mapping[str, str] = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

#: Variables glibc's loader or libc act on (its list of "unsecure" variables
#: and GLIBC_TUNABLES): never passed into the jail, whatever the caller asks.
_LOADER_VARS = frozenset({
    "GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "HOSTALIASES", "LOCALDOMAIN",
    "LOCPATH", "MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST", "MALLOC_PERTURB_",
    "MALLOC_TRACE", "MALLOC_CHECK_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_",
    "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TMPDIR", "TZDIR",
})
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

#: Devices every QEMU gets; anything else (``/dev/kvm``, ``/dev/vhost-net``) is asked for.
BASE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
#: Merged-/usr top-level links recreated inside when the host has them.
_TOP_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def _absolute(paths: Iterable[str | os.PathLike[str]], what: str) -> tuple[str, ...]:
    out = []
    for p in paths:
        text = os.fspath(p)
        if not text.startswith("/") or "\0" in text:
            raise ValueError(f"jail {what} path must be absolute: {text!r}")
        out.append(os.path.normpath(text))
    return tuple(dict.fromkeys(out))


def filter_env(env: Mapping[str, str]) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """``(kept, dropped)``: the loader's variables and malformed names never enter the jail."""
    kept, dropped = [], []
    for name, value in env.items():
        if (name.startswith("LD_") or name in _LOADER_VARS or not _ENV_NAME.match(name)
                or "\0" in value):
            dropped.append(name)
        else:
            kept.append((name, value))
    return tuple(kept), tuple(dropped)


@dataclass(frozen=True)
class JailSpec:
    """Everything one jailed process may see and be.

    Paths are bound at the same path inside, so QEMU's argv needs no rewriting.
    Nested binds (a read-only file inside a read-write dir) must already exist
    on the host: bwrap would otherwise create the mount point there.
    """

    #: The VM's own uid and gid; ``None`` keeps the caller's (a supervisor that is not root).
    uid: int | None
    gid: int | None
    #: Read-only: the emulator, its libraries, firmware, a kernel, ...
    ro_paths: tuple[str, ...] = ()
    #: Read-write: the VM's task dir, runtime dir, data dir.
    rw_paths: tuple[str, ...] = ()
    #: Device nodes it may open, besides :data:`BASE_DEVICES`.
    devices: tuple[str, ...] = ()
    #: Fds it inherits (QMP socketpair, images, taps, logs). The caller passes them
    #: to Popen's ``pass_fds``; bwrap and setpriv keep every fd that is not CLOEXEC.
    fds: tuple[int, ...] = ()
    #: Supplementary groups (e.g. the ``kvm`` group for /dev/kvm).
    groups: tuple[int, ...] = ()
    #: Share the host's network namespace: only for user-mode networking with
    #: ``hostfwd`` (slirp binds the forwarded ports in QEMU's own namespace).
    #: Tap and macvtap fds work from any namespace.
    share_net: bool = False
    #: Working directory inside (QEMU resolves relative paths from it).
    chdir: str | None = None
    #: QEMU's environment (already filtered by :func:`filter_env`).
    env: tuple[tuple[str, str], ...] = ()
    #: True: bwrap builds the jail in a user namespace of the VM's uid. False (a
    #: root supervisor on a host without unprivileged user namespaces): bwrap
    #: runs in its setuid mode, and QEMU stays in the host's user namespace.
    userns: bool = True
    #: An fd bwrap's child blocks on before executing QEMU (see docs/jail.md:
    #: lets the runtime put both pids into the VM's cgroup first).
    block_fd: int | None = None
    bwrap: str = BWRAP
    setpriv: str = SETPRIV
    #: Extra tmpfs mounts (``/tmp`` always is one).
    tmpfs: tuple[str, ...] = field(default=("/tmp",))

    def __post_init__(self) -> None:
        for name in ("ro_paths", "rw_paths", "devices", "tmpfs"):
            object.__setattr__(self, name, _absolute(getattr(self, name), name))
        if (self.uid is None) != (self.gid is None):
            raise ValueError("a jail switches both uid and gid, or neither")
        if not self.userns and self.uid is None:
            raise ValueError("a jail without a user namespace needs the VM's uid (and root)")
        for ident in (self.uid, self.gid, *self.groups):
            if ident is not None and not 0 < ident < 2**32 - 1:
                raise ValueError(f"jail uid/gid out of range: {ident}")
        if self.chdir is not None:
            object.__setattr__(self, "chdir", _absolute((self.chdir,), "chdir")[0])

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """Every fd the spawner must hand down (the spec's own and the block fd)."""
        extra = () if self.block_fd is None else (self.block_fd,)
        return tuple(dict.fromkeys((*self.fds, *extra)))


def _ancestors(path: str) -> list[str]:
    parts = PurePosixPath(path).parents
    return [str(p) for p in reversed(parts) if str(p) != "/"]


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _mounts(spec: JailSpec) -> list[str]:
    """tmpfs first, then world-searchable parent dirs, then binds shallowest first."""
    binds: list[tuple[str, str]] = [("--ro-bind", p) for p in spec.ro_paths]
    binds += [("--dev-bind", d) for d in dict.fromkeys((*BASE_DEVICES, *spec.devices))]
    binds += [("--bind", p) for p in spec.rw_paths]
    binds.sort(key=lambda b: (b[1].count("/"), b[1]))
    targets = [p for _, p in binds]
    args: list[str] = []
    for t in spec.tmpfs:
        args += ["--perms", "1777", "--tmpfs", t]
    # bwrap makes missing parents 0700 (root's): QEMU's uid could not pass them.
    made: set[str] = set()
    for target in targets:
        for parent in _ancestors(target):
            if parent in made or _under(parent, targets):
                continue
            made.add(parent)
            args += ["--perms", "0755", "--dir", parent]
    for kind, path in binds:
        args += [kind, path, path]
    for link in _TOP_LINKS:
        if os.path.islink(link) and link not in made and not _under(link, targets):
            args += ["--symlink", os.readlink(link), link]
    # Nothing may be created beside the binds: the root tmpfs becomes read-only.
    return [*args, "--remount-ro", "/"]


def _drop_identity(spec: JailSpec) -> list[str]:
    """setpriv before bwrap: the VM's uid/gid, no caps, no groups, no_new_privs."""
    if spec.uid is None:
        return []
    groups = ",".join(str(g) for g in spec.groups)
    args = [spec.setpriv, f"--regid={spec.gid}",
            f"--groups={groups}" if groups else "--clear-groups",
            "--inh-caps=-all", "--ambient-caps=-all"]
    if spec.userns:
        args += [f"--reuid={spec.uid}", "--bounding-set=-all"]
    else:
        # Only the real uid: bwrap sees ruid != euid 0 and runs as if installed
        # setuid, builds the namespaces with root's capabilities, then drops to
        # the real uid (and empties the bounding set) before executing anything.
        args.append(f"--ruid={spec.uid}")
    return [*args, "--no-new-privs", "--"]


def wrap_argv(argv: Iterable[str], spec: JailSpec) -> tuple[str, ...]:
    """The argv that runs ``argv`` (QEMU's, unchanged) inside ``spec``'s jail."""
    inner = tuple(argv)
    if not inner or not inner[0].startswith("/"):
        raise ValueError("the jailed program must be named by absolute path")
    args = [*_drop_identity(spec), spec.bwrap]
    if spec.userns:
        args += ["--unshare-user", "--disable-userns"]
    args += ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try",
             "--as-pid-1", "--new-session", "--cap-drop", "ALL"]
    if not spec.share_net:
        args.append("--unshare-net")
    args += _mounts(spec)
    if spec.chdir:
        args += ["--chdir", spec.chdir]
    args.append("--clearenv")
    for name, value in spec.env:
        args += ["--setenv", name, value]
    if spec.block_fd is not None:
        args += ["--block-fd", str(spec.block_fd)]
    # The parent-death signal is armed last, in QEMU's own process: its parent
    # is bwrap's monitor (same uid, so the kernel lets the signal through).
    return (*args, "--", spec.setpriv, "--pdeathsig=KILL", "--", *inner)


def decode_exit(code: int) -> tuple[int, int]:
    """``(exit_code, signal)`` of QEMU from the monitor's exit code (bwrap reports 128+N)."""
    if 128 < code < 128 + 65:
        return code, code - 128
    return code, 0


def catches(pid: int, signum: int) -> bool:
    """True if process ``pid`` has a handler for ``signum`` (so the kernel delivers it)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            caught = next(line for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) >> (signum - 1) & 1)


def jailed_pid(tracked_pid: int, timeout: float = 2.0) -> int | None:
    """QEMU's host pid: the only child of the bwrap monitor ``tracked_pid``.

    ``None`` if it has none within ``timeout`` (the monitor is gone or failed).
    Right after spawn the child may still be bwrap or setpriv; its pid does not
    change when it executes QEMU.
    """
    path = f"/proc/{tracked_pid}/task/{tracked_pid}/children"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path, encoding="ascii") as f:
                kids = f.read().split()
        except OSError:
            return None
        if kids:
            return int(kids[0])
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.005)
