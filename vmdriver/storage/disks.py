"""The virt task's ``disk`` blocks: what each disk asks of a pool and of QEMU.

Every field of nomad-driver-virt's ``disk`` block is here. Errors name the disk
by its 0-based position (``disk[1].size``), the position volumes are named by.
Defaults that depend on the pool (format, sparse) are left ``None`` here and
filled by :func:`vmdriver.storage.base.Pool.volume_request`; so is what a chained
disk may be (a directory pool's is a qcow2 overlay, a ceph pool's a raw RBD clone).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError, field_validator

from vmdriver.errors import SpecError
from vmdriver.units import SIZE_HELP, parse_size

DiskFormat = Literal["qcow2", "raw"]
BusType = Literal["virtio", "sata", "scsi", "ide", "usb"]
DiskKind = Literal["disk", "cdrom"]
#: What a guest can see as a stable name: a virtio-blk serial holds 20 bytes.
DEVNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,20}$", re.ASCII)
#: Formats an image given as ``source.format`` may have (what qemu-img reads).
SOURCE_FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vhdx", "vpc", "qed", "qcow", "dmg", "parallels")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DiskSource(_Frozen):
    """Where a disk's first contents come from: an image file, or a volume in the pool."""

    #: An image path (task dir or ``image_paths``), resolved by the caller.
    image: str | None = None
    #: A volume already in the disk's pool.
    volume: str | None = None
    #: The source's format; detected with ``qemu-img info`` when unset.
    format: str | None = None

    @field_validator("image", "volume")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "\x00" in value):
            raise ValueError("expected a non-empty name without NUL bytes")
        return value

    @field_validator("format")
    @classmethod
    def _format(cls, value: str | None) -> str | None:
        if value is not None and value not in SOURCE_FORMATS:
            raise ValueError(f"unsupported image format {value!r} (allowed: "
                             f"{', '.join(SOURCE_FORMATS)})")
        return value


class DiskRequest(_Frozen):
    """One ``disk { }`` block, validated; sizes in bytes."""

    size: int | None = None
    #: Thin (True) or preallocated (False); ``None``: the pool's default.
    sparse: StrictBool | None = None
    #: ``None``: the pool's default (directory: qcow2; cdrom: raw).
    format: DiskFormat | None = None
    bus_type: BusType = "virtio"
    #: The name the guest sees (serial → ``/dev/disk/by-id/``); auto when unset.
    devname: str | None = None
    kind: DiskKind = "disk"
    read_only: StrictBool = False
    #: Pool name; ``None``: the default pool.
    pool: str | None = None
    primary: StrictBool = False
    chained: StrictBool = False
    source: DiskSource | None = None
    #: nomad-driver-virt's provider-specific driver name; only ``qemu`` exists here.
    driver: Literal["qemu"] = "qemu"
    #: A Nomad block-device volume mount (``/dev/...``) backing the disk instead of a pool.
    volume: str | None = None

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int | None:
        if value is None:
            return None
        size = parse_size(value)
        if size <= 0:
            raise ValueError("size must be more than 0 bytes")
        return size

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, value: Any) -> Any:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("source block may appear only once")
            return value[0]
        return value

    @field_validator("devname")
    @classmethod
    def _devname(cls, value: str | None) -> str | None:
        if value is not None and not DEVNAME_RE.match(value):
            raise ValueError("expected 1-20 letters, digits, '_', '.', '-'")
        return value

    @field_validator("volume")
    @classmethod
    def _volume(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/dev/") or "\x00" in value):
            raise ValueError("expected the destination of a block-device volume mount, "
                             "like /dev/vdb")
        return value


def _check_one(disk: DiskRequest, where: str) -> DiskRequest:
    """Field combinations a single disk may not have."""
    src = disk.source
    if src is not None and (src.image is None) == (src.volume is None):
        what = "define an image or volume" if src.image is None else "not define both"
        raise SpecError(f"disk source must {what}", where=f"{where}.source",
                        allowed="source.image or source.volume")
    if disk.chained and src is None:
        raise SpecError("chained cannot be enabled without a source", where=f"{where}.chained")
    if disk.chained and disk.sparse is False:
        raise SpecError("a chained disk is thin: it cannot be preallocated",
                        where=f"{where}.sparse", value=False, allowed="true, or chained = false")
    if disk.kind == "cdrom":
        _check_cdrom(disk, where)
    elif disk.read_only and disk.bus_type in ("ide", "sata"):
        # QEMU's ide-hd has no read-only mode; a guest could not be kept from writing.
        raise SpecError("an IDE/SATA disk cannot be read-only in QEMU", where=f"{where}.bus_type",
                        value=disk.bus_type, allowed="virtio, scsi or usb for a read_only disk")
    if src is None and disk.size is None and disk.volume is None:
        raise SpecError("an empty disk needs a size", where=f"{where}.size", allowed=SIZE_HELP)
    if disk.volume is not None:
        _check_nomad_volume(disk, where)
    return disk


def _check_cdrom(disk: DiskRequest, where: str) -> None:
    if disk.source is None:
        raise SpecError("a cdrom needs a source", where=f"{where}.source",
                        allowed="source { image = ... } or source { volume = ... }")
    if "read_only" in disk.model_fields_set and not disk.read_only:
        raise SpecError("a cdrom is always read-only", where=f"{where}.read_only", value=False)
    if disk.chained:
        raise SpecError("a cdrom cannot be chained", where=f"{where}.chained")
    if disk.bus_type in ("virtio", "usb") and "bus_type" in disk.model_fields_set:
        raise SpecError("a cdrom needs an ide, sata or scsi bus", where=f"{where}.bus_type",
                        value=disk.bus_type, allowed="ide, sata, scsi")


def _check_nomad_volume(disk: DiskRequest, where: str) -> None:
    for name in ("format", "size", "sparse", "pool", "chained"):
        if name in disk.model_fields_set:
            raise SpecError(f"{name} cannot be set when using a Nomad volume",
                            where=f"{where}.{name}")
    if disk.source is not None and disk.source.volume is not None:
        raise SpecError("source.volume cannot be set when using a Nomad volume",
                        where=f"{where}.source.volume")


def parse_disk(raw: object, where: str) -> DiskRequest:
    """One disk block body (a dict, as python-hcl2 or msgpack give it)."""
    if not isinstance(raw, dict):
        raise SpecError("expected a disk block", where=where)
    try:
        disk = DiskRequest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
        msg = str(err["msg"]).removeprefix("Value error, ")
        value = None if err["type"] == "value_error" else err.get("input")
        allowed = ""
        if err["type"] == "extra_forbidden":
            msg, value = "unknown field", None
            allowed = ", ".join(DiskSource.model_fields if "source" in field
                                else DiskRequest.model_fields)
        elif err["type"] == "literal_error":
            msg, allowed = "value not allowed", str(err.get("ctx", {}).get("expected", ""))
        raise SpecError(msg[:1].lower() + msg[1:], where=f"{where}.{field}", value=value,
                        allowed=allowed) from None
    except SpecError as exc:  # from parse_size, raised inside a validator
        raise SpecError(exc.message, where=f"{where}.size", value=raw.get("size"),
                        allowed=SIZE_HELP) from None
    return _check_one(disk, where)


def parse_disks(raw: object, where: str = "disk") -> tuple[DiskRequest, ...]:
    """Every disk of a task, with the primary, kinds and device names settled.

    Exactly one disk is primary. Without any ``primary = true``, a lone disk, or
    the only one of kind ``disk`` (the others being cdroms), is the primary.
    """
    if raw is None:
        return ()
    items = raw if isinstance(raw, list | tuple) else [raw]
    disks = [parse_disk(item, f"{where}[{i}]") for i, item in enumerate(items)]
    if not disks:
        return ()
    disks = _settle_primary(disks, where)
    disks = [_settle_defaults(d) for d in disks]
    return tuple(_settle_devnames(disks, where))


def _settle_primary(disks: list[DiskRequest], where: str) -> list[DiskRequest]:
    primaries = [i for i, d in enumerate(disks) if d.primary]
    if len(primaries) > 1:
        raise SpecError("more than one primary disk", where=", ".join(
            f"{where}[{i}].primary" for i in primaries), allowed="exactly one primary disk")
    if primaries:
        return disks
    plain = [i for i, d in enumerate(disks) if d.kind == "disk"]
    pick = 0 if len(disks) == 1 else (plain[0] if len(plain) == 1 else None)
    if pick is None:
        raise SpecError("no primary disk defined", where=where,
                        allowed="primary = true on exactly one disk")
    disks[pick] = disks[pick].model_copy(update={"primary": True})
    return disks


def _settle_defaults(disk: DiskRequest) -> DiskRequest:
    update: dict[str, Any] = {}
    if disk.kind == "cdrom":
        update["read_only"] = True
        if "bus_type" not in disk.model_fields_set:
            update["bus_type"] = "ide"
    return disk.model_copy(update=update) if update else disk


def _settle_devnames(disks: Sequence[DiskRequest], where: str) -> list[DiskRequest]:
    """Unique device names: given ones kept, others ``vda``, ``vdb``... (``sda`` off virtio)."""
    taken: dict[str, int] = {}
    for i, disk in enumerate(disks):
        if disk.devname is not None:
            if disk.devname in taken:
                raise SpecError("devname already used by another disk",
                                where=f"{where}[{i}].devname", value=disk.devname)
            taken[disk.devname] = i
    out = []
    for disk in disks:
        if disk.devname is not None:
            out.append(disk)
            continue
        prefix = "vd" if disk.bus_type == "virtio" else "sd"
        n = 0
        while (name := prefix + _letters(n)) in taken:
            n += 1
        taken[name] = -1
        out.append(disk.model_copy(update={"devname": name}))
    return out


def _letters(n: int) -> str:
    """0 → a, 25 → z, 26 → aa: the kernel's sd/vd naming."""
    out = ""
    n += 1
    while n:
        n, rem = divmod(n - 1, 26)
        out = chr(ord("a") + rem) + out
    return out
