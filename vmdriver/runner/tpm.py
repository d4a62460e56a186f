"""swtpm, the software TPM 2.0 a VM with ``useTpm`` gets: its argv, first-start setup
and readiness.

The runtime starts swtpm as a helper process of the VM, before QEMU, and stops it with
the VM; this module only describes it. The state lives in ``<dataDir>/tpm`` so keys
sealed by the guest (BitLocker, LUKS with systemd-cryptenroll) survive restarts.
VM-Operator keeps it in the data dir itself: :func:`prepare_state_dir` moves such a
state into ``tpm/`` so a VM-Operator data dir keeps its TPM.

QEMU attaches with::

    -chardev socket,id=chrtpm,path=<runtimeDir>/swtpm.sock
    -tpmdev emulator,id=tpm0,chardev=chrtpm
    -device tpm-tis,tpmdev=tpm0

VM-Operator waits for swtpm's socket with no timeout; :func:`wait_ready` has one and
notices swtpm dying first.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import shutil
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

from vmdriver.errors import HostError, LaunchError

#: The file swtpm writes its TPM 2.0 state to (``--tpmstate dir=``).
STATE_FILE = "tpm2-00.permall"
#: Seconds swtpm gets to create its socket (it takes ~10 ms here; a loaded node more).
START_TIMEOUT = 10.0


def find_swtpm(name: str = "swtpm") -> str:
    """The swtpm (or swtpm_setup) executable; a clear error where it is not installed."""
    found = shutil.which(name)
    if found is None:
        raise HostError(f"useTpm needs {name}, which is not on PATH (Debian: apt-get install "
                        "swtpm swtpm-tools)")
    return found


def swtpm_argv(state_dir: Path, ctrl_socket: Path, *, binary: str = "swtpm") -> tuple[str, ...]:
    """swtpm in the foreground, serving QEMU on a unix control socket.

    ``--terminate`` ends swtpm when QEMU closes the connection, so even a QEMU killed
    with SIGKILL takes its swtpm along. Logging goes to the console (stderr), which
    the runtime collects; swtpm 0.7 refuses ``--log fd=2``.
    """
    return (
        binary, "socket", "--tpm2",
        "--tpmstate", f"dir={state_dir},mode=0600",
        "--ctrl", f"type=unixio,path={ctrl_socket},mode=0600",
        "--terminate",
        "--log", "level=1",
    )


def needs_setup(state_dir: Path) -> bool:
    """True before the first start: swtpm has never written a state there."""
    return not (state_dir / STATE_FILE).exists()


def swtpm_setup_argv(state_dir: Path, *, binary: str = "swtpm_setup") -> tuple[str, ...]:
    """Manufacture the TPM on first start, as libvirt does: EK and platform certificates
    signed by swtpm's local CA, NVRAM locked. ``--not-overwrite`` makes a second run a no-op.

    Optional: swtpm also starts on an empty state dir (VM-Operator does that), but then
    the TPM has no EK certificate, which some guests' attestation checks want.
    """
    return (
        binary, "--tpm2", "--tpmstate", str(state_dir),
        "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--not-overwrite",
    )


def prepare_state_dir(data_dir: Path) -> Path:
    """``<data_dir>/tpm``, created private; a VM-Operator state in ``data_dir`` moved in."""
    state = data_dir / "tpm"
    state.mkdir(mode=0o700, exist_ok=True)
    legacy = data_dir / STATE_FILE
    if legacy.is_file() and not (state / STATE_FILE).exists():
        legacy.replace(state / STATE_FILE)
    return state


def socket_ready(path: Path) -> bool:
    """True once ``path`` is a unix socket that accepts a connection.

    A probe connection does not end swtpm under ``--terminate`` (only the end of
    QEMU's session does), measured with swtpm 0.7.1.
    """
    try:
        if not stat.S_ISSOCK(path.stat().st_mode):
            return False
    except FileNotFoundError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN):
                return False
            raise
    return True


async def wait_ready(path: Path, alive: Callable[[], bool], *,
                     timeout: float = START_TIMEOUT, interval: float = 0.02) -> float:
    """Wait until swtpm's control socket accepts connections; return the seconds it took.

    ``alive`` says whether swtpm still runs (e.g. ``lambda: proc.returncode is None``),
    so a swtpm that exits (bad state dir, socket in use) fails at once instead of
    after the timeout.
    """
    start = time.monotonic()
    while True:
        if socket_ready(path):
            return time.monotonic() - start
        if not alive():
            raise LaunchError(f"swtpm exited before it created {path}")
        if time.monotonic() - start > timeout:
            raise LaunchError(f"swtpm did not create {path} within {timeout:g} s")
        await asyncio.sleep(interval)


def remove_stale_socket(path: Path) -> None:
    """Remove a socket a killed runner left behind, so readiness means *this* swtpm."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
