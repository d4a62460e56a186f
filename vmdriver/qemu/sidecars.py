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


def swtpm(version: str, runtime_dir: Path, data_dir: Path) -> HelperSpec:
    """swtpm serving QEMU's ``-tpmdev emulator`` on a control socket; state in the data dir.

    ``--terminate`` ends it when QEMU closes the connection; ``--flags
    startup-clear`` initialises a fresh TPM so no ``swtpm_setup`` run is needed.
    """
    state = data_dir / "tpm"
    sock = runtime_dir / TPM_SOCKET
    argv = ["swtpm", "socket", "--tpmstate", f"dir={state},mode=0600",
            "--ctrl", f"type=unixio,path={sock},mode=0600", "--terminate",
            "--log", f"file={runtime_dir / 'swtpm.log'},level=1"]
    if version == "2.0":
        argv += ["--tpm2", "--flags", "startup-clear"]
    return HelperSpec("swtpm", tuple(argv), sock, state_dirs=(state,))


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
        argv = ("bwrap", "--dev-bind", "/", "/", "--ro-bind", path, path, "--", *argv)
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
