"""The devices of a VM: drives, NICs, channels, shared directories.

Each model says what the guest gets, not how QEMU spells it: the argv layer
(:mod:`vmdriver.qemu.argv`) renders drives as ``-blockdev`` node graphs plus
``-device``, NICs as ``-netdev`` plus ``-device``. Ids given here become QEMU
ids and QMP node names, so they are validated once, here.
"""

from __future__ import annotations

import enum
import hashlib
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vmdriver.spec import defaults

#: QEMU ids: a letter, then letters, digits, ``-``, ``_`` (QEMU's id_wellformed), short.
ID_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,31}$"
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class Frozen(BaseModel):
    """Base of every spec model: immutable and strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Bus(enum.StrEnum):
    """Where a drive is attached.

    ``virtio``, ``ide``, ``sata``, ``scsi`` and ``usb`` render as ``-device``s.
    The other values are the ``-drive if=`` buses of Nomad's qemu driver that
    have no single-device equivalent (legacy SCSI HBA, SD, MTD, floppy,
    pflash, ``none``); they keep ``-drive if=`` so old jobs see the same guest.
    """

    VIRTIO = "virtio"
    IDE = "ide"
    SATA = "sata"
    SCSI = "scsi"
    USB = "usb"
    LEGACY_SCSI = "legacy-scsi"
    SD = "sd"
    MTD = "mtd"
    FLOPPY = "floppy"
    PFLASH = "pflash"
    NONE = "none"

    @property
    def legacy(self) -> bool:
        """True for buses rendered as ``-drive if=``."""
        return self in _LEGACY_BUSES


_LEGACY_BUSES = frozenset({Bus.LEGACY_SCSI, Bus.SD, Bus.MTD, Bus.FLOPPY, Bus.PFLASH, Bus.NONE})


class FileMedium(Frozen):
    """An image file (or block device) on this host."""

    kind: Literal["file"] = "file"
    #: As the face gave it; relative paths are inside the task dir.
    path: str
    #: Image format; ``None``: detected with ``qemu-img info`` before launch, so a raw
    #: image is never probed by QEMU itself.
    format: str | None = None
    #: Create this file before launch as a qcow2 overlay on ``overlay_on`` (a base that
    #: stays read-only: a cached artifact, a snapshot's frozen disk, a shared volume base).
    overlay_on: str | None = None


class RbdMedium(Frozen):
    """An image in a Ceph RBD pool; the secret reaches QEMU through a ``-object secret``."""

    kind: Literal["rbd"] = "rbd"
    pool: str
    image: str
    #: ``host:port`` of each monitor.
    monitors: tuple[str, ...]
    user: str
    #: Name of the host-side secret (never the key itself): resolved by the runtime.
    secret_ref: str


Medium = Annotated[FileMedium | RbdMedium, Field(discriminator="kind")]
CacheMode = Literal["writeback", "none", "writethrough", "directsync", "unsafe"]


class Drive(Frozen):
    """One block device the guest sees."""

    #: Unique within the VM; QEMU id of the device and prefix of its block nodes.
    id: str = Field(pattern=ID_PATTERN)
    #: ``None`` is an empty tray (CD-ROMs only), loaded later with ``blockdev-change-medium``.
    medium: Medium | None = None
    kind: Literal["disk", "cdrom"] = "disk"
    bus: Bus = Bus.VIRTIO
    #: Position on its bus, as ``-drive index=`` counts it (IDE: 0 = ide.0 master,
    #: 2 = ide.1 master); ``None``: the next free one.
    index: int | None = Field(default=None, ge=0, le=63)
    read_only: bool = False
    #: Firmware boot order; lower boots first. ``None``: not in the boot list.
    boot_index: int | None = Field(default=None, ge=0)
    #: Serial the guest sees (stable names under /dev/disk/by-id).
    serial: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,20}$")
    cache: CacheMode = "writeback"
    #: Pass the guest's discards (TRIM) down to the image.
    discard: bool = False
    #: Where the face's user wrote this drive (``config.image_path``, ``disk[1]``): what
    #: error messages about it name.
    origin: str = ""

    def model_post_init(self, _context: object) -> None:
        if self.medium is None and self.kind != "cdrom":
            raise ValueError(f"drive {self.id}: only a cdrom may have an empty tray")
        if self.bus.legacy and self.medium is None:
            raise ValueError(f"drive {self.id}: an empty tray needs a device bus, not {self.bus}")
        if self.read_only and self.kind == "disk" and self.bus in (Bus.IDE, Bus.SATA):
            # QEMU's ide-hd refuses a read-only node ("Block node is read-only").
            raise ValueError(f"drive {self.id}: an IDE/SATA disk cannot be read-only in QEMU; "
                             "use bus virtio or scsi")
        if self.bus.legacy and self.boot_index is not None:
            raise ValueError(f"drive {self.id}: a boot index needs a device bus, not {self.bus}")

    @property
    def writable(self) -> bool:
        """True when the guest may write to the medium."""
        return not self.read_only and self.kind != "cdrom"


class PortForward(Frozen):
    """A host port that reaches a guest port."""

    label: str
    host_port: int = Field(ge=1, le=65535)
    guest_port: int = Field(ge=1, le=65535)
    #: Host address to bind; empty binds every address (Nomad's behaviour).
    host_ip: str = ""
    protocols: tuple[Literal["tcp", "udp"], ...] = ("udp", "tcp")


class _Nic(Frozen):
    #: Unique within the VM; the netdev id and the device id derive from it.
    id: str = Field(pattern=ID_PATTERN)
    #: Guest device model, e.g. ``virtio-net-pci``, ``e1000``.
    model: str = Field(default=defaults.NIC_MODEL, pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    #: ``None``: derived from the VM's id (deterministic, see :func:`derive_mac`).
    mac: str | None = None

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.lower()
        if not _MAC_RE.match(value) or int(value[:2], 16) & 1:
            raise ValueError(f"not a unicast MAC address: {value!r}")
        return value


class UserNic(_Nic):
    """User-mode networking (slirp): no host privileges, ports by ``hostfwd``."""

    kind: Literal["user"] = "user"
    forwards: tuple[PortForward, ...] = ()
    dns_servers: tuple[str, ...] = ()
    dns_searches: tuple[str, ...] = ()


class TapNic(_Nic):
    """A tap device on a host bridge; vmdriver creates it and hands QEMU its fd."""

    kind: Literal["tap"] = "tap"
    bridge: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,15}$")
    #: Host ports published to the guest through nftables.
    forwards: tuple[PortForward, ...] = ()


class MacvtapNic(_Nic):
    """A macvtap on a host device; vmdriver creates it and hands QEMU its fd."""

    kind: Literal["macvtap"] = "macvtap"
    device: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,15}$")
    mode: Literal["bridge", "private", "vepa", "passthrough"] = "bridge"


class NoNic(Frozen):
    """No network at all (``-nic none``); must be the only NIC."""

    kind: Literal["none"] = "none"


Nic = Annotated[UserNic | TapNic | MacvtapNic | NoNic, Field(discriminator="kind")]


class Channel(Frozen):
    """An extra serial port or virtio-serial port, backed by a socket in the runtime dir."""

    #: Unique; the socket is ``<runtime dir>/<id>.sock``.
    id: str = Field(pattern=ID_PATTERN)
    kind: Literal["serial", "virtio-serial"] = "virtio-serial"
    #: Port name the guest sees (virtio-serial), e.g. ``org.qemu.guest_agent.0``.
    name: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]{0,64}$")


class Share(Frozen):
    """A host directory the guest mounts by tag."""

    #: The mount tag in the guest.
    tag: str = Field(pattern=r"^[A-Za-z0-9_-]{1,31}$")
    #: Host directory, relative to the task dir or absolute (checked by policy).
    path: str
    read_only: bool = True
    transport: Literal["9p", "virtiofs"] = "9p"


def derive_mac(vm_key: str, nic_id: str) -> str:
    """A stable MAC for a NIC: QEMU's prefix plus three bytes of a hash of the VM and NIC."""
    digest = hashlib.sha256(f"{vm_key}/{nic_id}".encode()).digest()
    return f"{defaults.MAC_PREFIX}:{digest[0]:02x}:{digest[1]:02x}:{digest[2]:02x}"
