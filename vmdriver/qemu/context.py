"""Host facts an argv depends on, decided by the runtime before rendering.

The spec says what the VM is; a :class:`RenderContext` says where its pieces
are on this host: the emulator, the accelerator after ``auto``, the sockets in
the VM's runtime dir, and the file descriptors QEMU inherits instead of opening
paths (images, taps), so that QEMU uses exactly what policy checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DriveSource:
    """Where one drive's medium is, as QEMU will open it."""

    #: What QEMU opens: ``/dev/fdset/N`` when ``fds`` is set, else a path.
    path: str
    #: The image format (never left for QEMU to probe).
    format: str
    #: Open fds of the image (read-only first, then read-write) QEMU inherits.
    fds: tuple[int, ...] = ()
    #: ``-add-fd`` set number for ``fds``.
    fdset: int = 0
    #: The medium is a block device (QEMU's ``host_device`` driver, not ``file``).
    block_device: bool = False
    #: The backing chain below this image, top first, each also opened as an fd: QEMU
    #: then opens no backing file by name (a jailed QEMU could not read it anyway).
    backing: tuple[DriveSource, ...] = ()


@dataclass(frozen=True)
class RbdSource:
    """Where one drive's RBD medium is: options for ``driver=rbd`` and its secret file."""

    options: Mapping[str, object]
    #: A 0600 file in the runtime dir holding the base64 key.
    secret_file: Path


@dataclass(frozen=True)
class NicFds:
    """The fds QEMU gets for a tap or macvtap NIC."""

    tap: int
    vhost: int | None = None

    @property
    def all(self) -> tuple[int, ...]:
        """Every fd, for inheriting."""
        return (self.tap,) if self.vhost is None else (self.tap, self.vhost)


@dataclass(frozen=True)
class RenderContext:
    """Everything the argv needs that is not in the spec."""

    #: Absolute path of the emulator binary.
    binary: Path
    #: Accelerator after resolving ``auto`` (``kvm`` or ``tcg``).
    accelerator: str
    #: The VM's runtime dir: channel, TPM and virtiofs sockets live here.
    runtime_dir: Path
    #: The re-attach QMP socket.
    qmp_socket: Path
    #: The guest agent socket.
    qga_socket: Path
    #: Per drive id with a medium.
    drives: Mapping[str, DriveSource | RbdSource] = field(default_factory=dict)
    #: Per tap/macvtap NIC id.
    nic_fds: Mapping[str, NicFds] = field(default_factory=dict)
    #: Per share tag: the host directory, resolved and checked.
    share_paths: Mapping[str, str] = field(default_factory=dict)
    #: Inherited QMP socket fd in QEMU; ``None`` renders no fd monitor.
    qmp_fd: int | None = 3
    #: Add ``-sandbox`` (only where the binary supports it).
    sandbox: bool = False
    #: Add ``-no-user-config`` so host-wide QEMU config files do not leak in.
    no_user_config: bool = True
    #: The binary has SPICE compiled in.
    spice: bool = False

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """Every fd QEMU must inherit besides the QMP socket."""
        fds = [fd for src in self.drives.values() if isinstance(src, DriveSource)
               for layer in (src, *src.backing) for fd in layer.fds]
        fds += [fd for nic in self.nic_fds.values() for fd in nic.all]
        return tuple(fds)

    def socket(self, name: str) -> Path:
        """A socket path in the runtime dir."""
        return self.runtime_dir / name
