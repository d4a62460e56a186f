"""Drives as QEMU 7.2 wants them: ``-blockdev`` node graphs plus a ``-device`` each.

Every drive with a medium becomes two named nodes that QMP can address:

* ``<id>-file``: the protocol node (a file, an ``/dev/fdset/N`` fd set, or RBD);
* ``<id>``: the format node on top (``qcow2``, ``raw``...), which the device uses.

A CD-ROM without a medium is a device with an empty tray (load it later with
``blockdev-change-medium id=<id>``). Controllers (AHCI on ``pc``, virtio-scsi,
xHCI) are added once, when a drive needs them. The buses Nomad's qemu driver
offers that have no single-device form (legacy SCSI HBA, SD, MTD, floppy,
pflash, ``none``) keep ``-drive if=`` so old jobs see the same guest.

Blockdev options are written as JSON: no comma escaping to get wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from vmdriver.errors import SpecError
from vmdriver.qemu.context import DriveSource, RbdSource, RenderContext
from vmdriver.qemu.image import LAYERED_FORMATS
from vmdriver.spec import Bus, Drive, VMSpec

#: ``-drive if=`` values of the legacy buses.
_LEGACY_IF = {Bus.LEGACY_SCSI: "scsi", Bus.SD: "sd", Bus.MTD: "mtd", Bus.FLOPPY: "floppy",
              Bus.PFLASH: "pflash", Bus.NONE: "none"}
#: cache mode → (cache.direct, cache.no-flush, device write-cache on)
_CACHE = {
    "writeback": (False, False, True),
    "none": (True, False, True),
    "writethrough": (False, False, False),
    "directsync": (True, False, False),
    "unsafe": (False, True, True),
}


def qemu_escape(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax."""
    return value.replace(",", ",,")


def is_q35(spec: VMSpec) -> bool:
    """True for the q35 family of machine types."""
    return spec.machine_type == "q35" or spec.machine_type.startswith("pc-q35")


@dataclass
class _Slots:
    """IDE/SATA ports in use, and the controllers added so far."""

    q35: bool
    used: set[str] = field(default_factory=set)
    controllers: list[str] = field(default_factory=list)

    def controller(self, device: str) -> None:
        if device not in self.controllers:
            self.controllers.append(device)

    def ide(self, drive: Drive) -> str:
        """``bus=ide.N,unit=U`` for an IDE drive (``-drive index=`` numbering)."""
        ports = ([f"bus=ide.{i},unit=0" for i in range(6)] if self.q35 else
                 [f"bus=ide.{i // 2},unit={i % 2}" for i in range(4)])
        return self._take(drive, ports, "IDE")

    def sata(self, drive: Drive) -> str:
        """``bus=...`` for a SATA drive: q35's own AHCI ports, or an AHCI controller on pc."""
        if self.q35:
            return self.ide(drive)
        self.controller("ahci,id=sata0")
        return self._take(drive, [f"bus=sata0.{i}" for i in range(6)], "SATA")

    def _take(self, drive: Drive, ports: list[str], bus: str) -> str:
        if drive.index is not None:
            if drive.index >= len(ports) or ports[drive.index] in self.used:
                raise SpecError(f"{bus} position {drive.index} is taken or does not exist",
                                where=f"drive {drive.id}", allowed=f"0 to {len(ports) - 1}")
            choice = ports[drive.index]
        else:
            choice = next((p for p in ports if p not in self.used), "")
            if not choice:
                raise SpecError(f"no free {bus} port left", where=f"drive {drive.id}",
                                allowed=f"at most {len(ports)} {bus} drives")
        self.used.add(choice)
        return choice


def render_drives(spec: VMSpec, ctx: RenderContext) -> list[str]:
    """``-add-fd``, ``-object secret``, ``-blockdev``, ``-drive`` and ``-device`` args of every drive."""
    slots = _Slots(is_q35(spec))
    body: list[str] = []
    # Legacy buses first: their -drive index numbering must not see device drives.
    for drive in sorted(spec.drives, key=lambda d: not d.bus.legacy):
        src = ctx.drives.get(drive.id)
        if drive.medium is not None and src is None:
            raise SpecError("drive has a medium but no prepared source", where=f"drive {drive.id}")
        body += _fd_args(drive, src)
        if drive.bus.legacy:
            assert isinstance(src, DriveSource)
            body += ["-drive", _legacy_drive(drive, src)]
            continue
        if src is not None:
            body += list(_nodes(drive, src))
        body += _device(drive, src is not None, slots)
    controllers = [arg for dev in slots.controllers for arg in ("-device", dev)]
    return controllers + body


def _fd_args(drive: Drive, src: DriveSource | RbdSource | None) -> list[str]:
    if isinstance(src, RbdSource):
        return ["-object", f"secret,id={drive.id}-secret,format=base64,"
                           f"file={qemu_escape(str(src.secret_file))}"]
    if isinstance(src, DriveSource):
        return [a for layer in (src, *src.backing) for fd in layer.fds
                for a in ("-add-fd", f"fd={fd},set={layer.fdset},opaque={drive.id}")]
    return []


def _legacy_drive(drive: Drive, src: DriveSource) -> str:
    opts = [f"file={qemu_escape(src.path)}", f"if={_LEGACY_IF[drive.bus]}", f"id={drive.id}",
            f"format={src.format}"]
    if drive.index is not None:
        opts.append(f"index={drive.index}")
    if drive.kind == "cdrom":
        opts.append("media=cdrom")
    if drive.read_only:
        opts.append("readonly=on")
    return ",".join(opts)


def _nodes(drive: Drive, src: DriveSource | RbdSource) -> Iterator[str]:
    direct, no_flush, _ = _CACHE[drive.cache]
    ro = drive.read_only or drive.kind == "cdrom"
    common: dict[str, object] = {"read-only": ro, "discard": "unmap" if drive.discard else "ignore"}
    if isinstance(src, RbdSource):
        proto: dict[str, object] = {"driver": "rbd", **src.options, "key-secret": f"{drive.id}-secret"}
        fmt = "raw"
    else:
        proto = {"driver": "host_device" if src.block_device else "file", "filename": src.path,
                 "cache": {"direct": direct, "no-flush": no_flush}}
        fmt = src.format
    proto.update({"node-name": f"{drive.id}-file", **common})
    top: dict[str, object] = {"driver": fmt, "file": f"{drive.id}-file", "node-name": drive.id,
                              **common}
    if isinstance(src, DriveSource) and src.backing:
        # Backing layers first, deepest first (a node can only name nodes that exist),
        # each its own nodes on its own fd, read-only.
        names = [f"{drive.id}-b{i + 1}" for i in range(len(src.backing))]
        for i in reversed(range(len(src.backing))):
            below = names[i + 1] if i + 1 < len(names) else None
            yield from _layer(names[i], src.backing[i], below, cache=proto["cache"])
        top["backing"] = names[0]
    yield "-blockdev"
    yield json.dumps(proto, separators=(",", ":"))
    yield "-blockdev"
    yield json.dumps(top, separators=(",", ":"))


def _layer(name: str, layer: DriveSource, below: str | None, *, cache: object) -> Iterator[str]:
    file = {"driver": "file", "filename": layer.path, "node-name": f"{name}-file",
            "read-only": True, "cache": cache}
    fmt: dict[str, object] = {"driver": layer.format, "file": f"{name}-file", "node-name": name,
                              "read-only": True}
    if layer.format in LAYERED_FORMATS:
        fmt["backing"] = below  # None: QEMU must not open the recorded name by itself
    yield "-blockdev"
    yield json.dumps(file, separators=(",", ":"))
    yield "-blockdev"
    yield json.dumps(fmt, separators=(",", ":"))


def _device(drive: Drive, has_medium: bool, slots: _Slots) -> list[str]:
    model, where = _model_and_place(drive, slots)
    extra: list[str] = []
    if drive.bus is Bus.USB and drive.kind == "cdrom":
        # usb-storage is a disk only; a USB CD-ROM is a SCSI CD behind a bulk-only transport.
        extra = ["-device", f"usb-bot,id={drive.id}-bot,{where}"]
        where = f"bus={drive.id}-bot.0"
    opts = [model, where] if where else [model]
    if has_medium:
        opts.append(f"drive={drive.id}")
    opts.append(f"id={drive.id}")
    if drive.serial and drive.kind == "disk":
        opts.append(f"serial={drive.serial}")
    if drive.boot_index is not None:
        opts.append(f"bootindex={drive.boot_index}")
    if has_medium and not _CACHE[drive.cache][2] and drive.kind == "disk":
        opts.append("write-cache=off")
    return [*extra, "-device", ",".join(opts)]


def _model_and_place(drive: Drive, slots: _Slots) -> tuple[str, str]:
    cd = drive.kind == "cdrom"
    if drive.bus is Bus.VIRTIO and not cd:
        return "virtio-blk-pci", ""
    if drive.bus in (Bus.SCSI, Bus.VIRTIO):
        # virtio has no CD-ROM device: a CD on "virtio" is a SCSI CD on virtio-scsi.
        slots.controller("virtio-scsi-pci,id=scsi0")
        return ("scsi-cd" if cd else "scsi-hd"), "bus=scsi0.0"
    if drive.bus is Bus.IDE:
        return ("ide-cd" if cd else "ide-hd"), slots.ide(drive)
    if drive.bus is Bus.SATA:
        return ("ide-cd" if cd else "ide-hd"), slots.sata(drive)
    slots.controller("qemu-xhci,id=usb0")
    return ("scsi-cd" if cd else "usb-storage"), "bus=usb0.0"
