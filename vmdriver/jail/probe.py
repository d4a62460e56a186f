"""What this host can give a jail, and what the operator's ``jail`` setting makes of it.

:func:`probe` asks the host itself: it runs a real trial jail (the same argv a
VM gets, around ``/usr/bin/true``) rather than reading sysctls, so a kernel,
LSM or container that forbids a namespace is caught the same way a VM launch
would be. The answer is cached for the process.

Pieces, and what a missing one means (:func:`decide`):

* **essential**: ``bwrap`` that builds the namespaces and ``setpriv``
  (switches to the VM's uid, arms QEMU's parent-death signal); then either user namespaces for that
  uid, or, as root, bwrap's setuid mode (a warning says which). Without them
  there is no jail: ``required`` refuses to launch, ``preferred`` launches
  unjailed with a warning.
* **QEMU's seccomp** (``-sandbox``): ``required`` refuses, ``preferred`` warns.
* **cgroups**: no controllers at all is treated like seccomp; cgroup v1 only
  (or the hybrid layout, v2 mounted without controllers) is a warning, since
  the runtime still limits the VM through v1.

``off`` never jails and still says so: nothing about confinement is silent.
"""

from __future__ import annotations

import enum
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from vmdriver.errors import HostError
from vmdriver.jail.ids import DEFAULT_RANGE
from vmdriver.jail.paths import library_dirs
from vmdriver.jail.plan import BWRAP, LAUNCH_ENV, SETPRIV, JailSpec, wrap_argv

#: The seccomp argument vmdriver gives QEMU (see docs/policy.md, Hardening).
SANDBOX_ARG = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
_TRUE = "/usr/bin/true"


class JailMode(enum.StrEnum):
    """The host config's ``jail`` setting."""

    REQUIRED = "required"
    PREFERRED = "preferred"
    OFF = "off"


@dataclass(frozen=True)
class JailSupport:
    """The answer of :func:`probe`."""

    bwrap: str | None
    setpriv: bool
    uid_switch: bool
    #: A jail in a user namespace works (the default way).
    userns: bool
    cgroup: str
    seccomp: bool | None
    problems: tuple[str, ...]
    #: Without user namespaces, a jail through bwrap's setuid mode works (root only).
    setuid_mode: bool = False

    @property
    def available(self) -> bool:
        """True when a jail can be built on this host."""
        return self.bwrap is not None and (self.userns or self.setuid_mode)

    @property
    def mode(self) -> str:
        """How jails are built here: ``userns``, ``setuid`` or ``none``."""
        return "userns" if self.userns else "setuid" if self.setuid_mode else "none"

    def as_dict(self) -> dict[str, str | bool]:
        """Flat attributes for ``vmdriver fingerprint``."""
        out: dict[str, str | bool] = {
            "jail.available": self.available,
            "jail.mode": self.mode,
            "jail.bwrap": self.bwrap or "missing",
            "jail.setpriv": self.setpriv,
            "jail.uid_per_vm": self.uid_switch and self.available,
            "jail.userns": self.userns,
            "jail.cgroup": self.cgroup,
            "jail.seccomp": "unknown" if self.seccomp is None else self.seccomp,
        }
        if self.problems:
            out["jail.problems"] = "; ".join(self.problems)
        return out


def _run(argv: tuple[str, ...], timeout: float = 10.0) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=False, stdin=subprocess.DEVNULL, env=dict(LAUNCH_ENV))
    except (OSError, subprocess.TimeoutExpired):
        return None


def _last_line(proc: subprocess.CompletedProcess[str] | None) -> str:
    if proc is None:
        return "could not be run"
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit status {proc.returncode}"


def cgroup_layout(root: Path = Path("/sys/fs/cgroup"), mounts: Path = Path("/proc/self/mounts")) -> str:
    """``v2``, ``hybrid`` (v2 mounted beside v1, without controllers), ``v1`` or ``none``."""
    if (root / "cgroup.controllers").exists():
        return "v2"
    try:
        types = [line.split()[2] for line in mounts.read_text().splitlines() if line.count(" ") >= 3]
    except OSError:
        types = []
    if "cgroup" in types:
        return "hybrid" if "cgroup2" in types else "v1"
    return "v2" if "cgroup2" in types else "none"


def qemu_seccomp(emulator: str) -> bool:
    """True if ``emulator`` accepts vmdriver's ``-sandbox`` argument (seccomp built in)."""
    proc = _run((emulator, "-sandbox", SANDBOX_ARG, "-version"))
    return proc is not None and proc.returncode == 0


def _trial(bwrap: str, setpriv: str, uid: int | None, *, userns: bool = True) -> str | None:
    """Run ``true`` in a jail like a VM's; ``None`` if it worked, else why not."""
    try:
        ro = (_TRUE, setpriv, *library_dirs(_TRUE), *library_dirs(setpriv))
    except HostError as exc:
        return str(exc)
    spec = JailSpec(uid=uid, gid=uid, ro_paths=ro, bwrap=bwrap, setpriv=setpriv, userns=userns)
    proc = _run(wrap_argv((_TRUE,), spec))
    if proc is not None and proc.returncode == 0:
        return None
    how = "in a user namespace" if userns else "in bwrap's setuid mode"
    return f"trial jail {how} failed: {_last_line(proc)}"


_cache: dict[tuple[str, str, str | None, int], JailSupport] = {}
_lock = threading.Lock()


def probe(emulator: str | None = None, *, bwrap: str = BWRAP, setpriv: str = SETPRIV,
          trial_uid: int = DEFAULT_RANGE.last) -> JailSupport:
    """What this host can provide; ``emulator`` is asked about seccomp if given.

    As root the trial jail runs as ``trial_uid`` (by default the last id of the
    VM range, which VMs get last).
    """
    key = (bwrap, setpriv, emulator, trial_uid)
    with _lock:
        if key in _cache:
            return _cache[key]
    problems: list[str] = []
    version = _run((bwrap, "--version"))
    bwrap_version = version.stdout.strip() if version and version.returncode == 0 else None
    if bwrap_version is None:
        problems.append(f"bwrap ({bwrap}) {_last_line(version)}")
    has_setpriv = os.access(setpriv, os.X_OK)
    root = os.geteuid() == 0
    if not has_setpriv:
        problems.append(f"setpriv ({setpriv}) missing: it switches uid and ties QEMU to the jail")
    userns = setuid_mode = False
    if bwrap_version is not None and has_setpriv:
        why = _trial(bwrap, setpriv, trial_uid if root else None)
        userns = why is None
        if why:
            problems.append(why)
        if why and root:
            why = _trial(bwrap, setpriv, trial_uid, userns=False)
            setuid_mode = why is None
            if why:
                problems.append(why)
    seccomp = qemu_seccomp(emulator) if emulator else None
    if seccomp is False:
        problems.append(f"{emulator} has no seccomp (-sandbox)")
    support = JailSupport(bwrap_version, has_setpriv, root, userns, cgroup_layout(),
                          seccomp, tuple(problems), setuid_mode)
    with _lock:
        _cache[key] = support
    return support


def clear_cache() -> None:
    """Forget the answers (tests, or after installing a tool)."""
    with _lock:
        _cache.clear()


def decide(mode: JailMode, support: JailSupport) -> tuple[bool, tuple[str, ...]]:
    """``(jail, warnings)`` for a launch; raises :class:`HostError` where ``required`` fails."""
    if mode is JailMode.OFF:
        return False, ("jail = off: QEMU runs without its own uid or mount namespace",)
    missing = [] if support.available else [*support.problems] or ["no jail"]
    weak = []
    if support.seccomp is False:
        weak.append("QEMU without seccomp (-sandbox)")
    if support.cgroup == "none":
        weak.append("no cgroup controllers")
    notes = []
    if support.cgroup in ("v1", "hybrid"):
        notes.append(f"cgroup {support.cgroup}: VM limits through cgroup v1")
    if not support.uid_switch:
        notes.append("not root: jailed VMs keep the supervisor's uid")
    if support.mode == "setuid":
        notes.append("no user namespaces: jails built by bwrap's setuid mode")
    if mode is JailMode.REQUIRED and (missing or weak):
        reasons = "; ".join(dict.fromkeys((*missing, *weak)))
        raise HostError(f"jail = required, but this host cannot provide it: {reasons}")
    if missing:
        return False, (f"jail unavailable ({'; '.join(missing)}): QEMU runs unjailed", *weak)
    return True, (*weak, *notes)
