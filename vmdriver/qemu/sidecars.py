"""Helper processes a VM's devices need: swtpm for a TPM, virtiofsd for virtiofs shares.

This module only says *what* to run and how to tell it is ready; the runtime
starts them before QEMU, records them for re-attaching, and stops them after
QEMU (:mod:`vmdriver.runtime.helpers`). Their sockets live in the VM's runtime
dir, where :mod:`vmdriver.qemu.devices` points QEMU's chardevs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmdriver.qemu.devices import TPM_SOCKET, virtiofs_socket
from vmdriver.spec import VMSpec

#: Debian's virtiofsd (the C one shipped with QEMU 7.2).
VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
#: Seconds a helper may take to create its socket.
START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class HelperSpec:
    """One helper process of a VM."""

    #: Unique per VM: ``swtpm``, ``virtiofsd-<tag>``.
    name: str
    argv: tuple[str, ...]
    #: The unix socket that exists (and accepts) once the helper is ready.
    ready_socket: Path | None
    start_timeout_s: float = START_TIMEOUT_S
    #: Another readiness test, for helpers without a socket (dnsmasq: its pid file).
    ready_check: Callable[[], bool] | None = None
    #: Directories the helper writes (its state), made before it starts.
    state_dirs: tuple[Path, ...] = ()


def helpers_for(spec: VMSpec, runtime_dir: Path, data_dir: Path,
                share_paths: dict[str, str]) -> tuple[HelperSpec, ...]:
    """The helpers ``spec`` needs, in start order."""
    out: list[HelperSpec] = []
    if spec.tpm is not None:
        out.append(swtpm(spec.tpm.version, runtime_dir, data_dir))
    for share in spec.shares:
        if share.transport == "virtiofs":
            out.append(virtiofsd(share.tag, share_paths[share.tag], runtime_dir,
                                 read_only=share.read_only))
    return tuple(out)


#: The file swtpm keeps a TPM 2.0's state in (``--tpmstate dir=``).
TPM2_STATE_FILE = "tpm2-00.permall"
#: Extra seconds a first start may take: swtpm_setup makes the EK and its certificate.
TPM_SETUP_TIMEOUT_S = 30.0

# First start of a TPM 2.0, then swtpm itself (exec: the helper's pid stays swtpm's).
# A state VM-Operator kept in the data dir itself is moved into tpm/, so a migrated
# data dir keeps what the guest sealed with its TPM; else swtpm_setup manufactures
# the TPM as libvirt does (EK and platform certificates from swtpm's local CA, NVRAM
# locked). It is optional: without swtpm-tools, or where it fails (no writable local
# CA for this user), swtpm starts on an empty state, a TPM without EK certificate.
_FIRST_START = f"""data=$1 state=$2; shift 2
if [ ! -e "$state/{TPM2_STATE_FILE}" ]; then
    if [ -f "$data/{TPM2_STATE_FILE}" ]; then
        mv "$data/{TPM2_STATE_FILE}" "$state/{TPM2_STATE_FILE}" || exit 1
    elif command -v swtpm_setup >/dev/null 2>&1; then
        swtpm_setup --tpm2 --tpmstate "$state" --create-ek-cert --create-platform-cert \\
            --lock-nvram --not-overwrite \\
            || {{ echo "swtpm_setup failed: the TPM has no EK certificate" >&2;
                 rm -f "$state/{TPM2_STATE_FILE}"; }}
    fi
fi
exec "$@"
"""


def swtpm(version: str, runtime_dir: Path, data_dir: Path) -> HelperSpec:
    """swtpm serving QEMU's ``-tpmdev emulator`` on a control socket; state in the data dir.

    ``--terminate`` ends it when QEMU closes the connection (even a SIGKILLed QEMU
    takes its swtpm along); ``--flags startup-clear`` starts the TPM itself, so a
    guest whose firmware does not works too. A TPM 2.0's first start runs
    :data:`_FIRST_START` before swtpm: VM-Operator's state moved in, or swtpm_setup.
    """
    state = data_dir / "tpm"
    sock = runtime_dir / TPM_SOCKET
    argv = ["swtpm", "socket", "--tpmstate", f"dir={state},mode=0600",
            "--ctrl", f"type=unixio,path={sock},mode=0600", "--terminate",
            "--log", f"file={runtime_dir / 'swtpm.log'},level=1"]
    if version != "2.0":
        return HelperSpec("swtpm", tuple(argv), sock, state_dirs=(state,))
    argv += ["--tpm2", "--flags", "startup-clear"]
    first = not (state / TPM2_STATE_FILE).exists()
    return HelperSpec("swtpm", ("/bin/sh", "-c", _FIRST_START, "swtpm", str(data_dir), str(state),
                                *argv), sock,
                      start_timeout_s=START_TIMEOUT_S + (TPM_SETUP_TIMEOUT_S if first else 0),
                      state_dirs=(state,))


def virtiofsd(tag: str, path: str, runtime_dir: Path, *, read_only: bool) -> HelperSpec:
    """virtiofsd exporting ``path`` to QEMU's vhost-user-fs device for ``tag``.

    QEMU 7.2's virtiofsd has no read-only export; a read-only share runs it in a
    mount namespace where the source is bound read-only, so a guest's write fails
    on the host side, whatever the guest's mount options say.
    """
    sock = runtime_dir / virtiofs_socket(tag)
    argv: tuple[str, ...] = (str(VIRTIOFSD), f"--socket-path={sock}", "-o",
                             f"source={path},cache=auto")
    if read_only:
        # --die-with-parent: stopping the helper (bwrap) must not orphan virtiofsd.
        argv = ("bwrap", "--die-with-parent", "--dev-bind", "/", "/", "--ro-bind", path, path,
                "--", *argv)
    # Ready once the socket exists: virtiofsd serves exactly one vhost-user connection and
    # exits when it closes, so the usual connect-and-close probe would end it before QEMU.
    return HelperSpec(f"virtiofsd-{tag}", argv, None, ready_check=_handed_over(sock))


def _handed_over(sock: Path) -> Callable[[], bool]:
    """Readiness of a socket only QEMU may connect to: it exists, and it is given to the
    owner of its directory (a jailed QEMU's uid; root otherwise). virtiofsd makes it 0600."""
    def ready() -> bool:
        try:
            owner = sock.parent.stat()
            os.chown(sock, owner.st_uid, owner.st_gid)
        except FileNotFoundError:
            return False
        return True

    return ready
