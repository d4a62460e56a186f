"""The ``driver = "qemu"`` task config, and its mapping into a :class:`VMSpec`.

Both faces that take Nomad tasks use :func:`build_spec`: `vmdriver run` after
reading a job file, the Nomad plugin after decoding StartTask's msgpack.
"""

from __future__ import annotations

import enum
import logging
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vmdriver.errors import SpecError
from vmdriver.host.emulators import normalize_emulator
from vmdriver.jobfile.inputs import TaskInputs, check_dns, stop_policy, task_resources
from vmdriver.spec import (
    Accelerator,
    ArtifactSpec,
    Bus,
    Drive,
    FileMedium,
    PortForward,
    UserNic,
    VMSpec,
    defaults,
)
from vmdriver.units import parse_port

log = logging.getLogger(__name__)


class DriveInterface(enum.StrEnum):
    """``drive_interface`` values of Nomad's qemu driver (QEMU's ``-drive if=``)."""

    IDE = "ide"
    SCSI = "scsi"
    SD = "sd"
    MTD = "mtd"
    FLOPPY = "floppy"
    PFLASH = "pflash"
    VIRTIO = "virtio"
    NONE = "none"


#: ``if=scsi`` is a legacy LSI HBA, not virtio-scsi: it keeps ``-drive`` (see Bus).
_BUSES = {DriveInterface.IDE: Bus.IDE, DriveInterface.VIRTIO: Bus.VIRTIO,
          DriveInterface.SCSI: Bus.LEGACY_SCSI, DriveInterface.SD: Bus.SD,
          DriveInterface.MTD: Bus.MTD, DriveInterface.FLOPPY: Bus.FLOPPY,
          DriveInterface.PFLASH: Bus.PFLASH, DriveInterface.NONE: Bus.NONE}


class QemuTaskConfig(BaseModel):
    """Fields of a qemu task's ``config {}``; unknown keys are errors, as in Nomad."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    image_path: str | None = None
    emulator: str = defaults.EMULATOR
    # No `,` or `=`: they would smuggle machine properties past args_allowlist.
    machine_type: str = Field(default=defaults.MACHINE, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    accelerator: Accelerator = Field(default=Accelerator.TCG, strict=False)
    drive_interface: DriveInterface = Field(default=DriveInterface.IDE, strict=False)
    graceful_shutdown: bool = False
    guest_agent: bool = False
    #: Graceful stops ask the guest agent (``guest-shutdown``) first, ACPI as the fallback.
    guest_agent_shutdown: bool = False
    #: A virtio balloon: the guest's own memory view in TaskStats and metrics.
    balloon: bool = False
    port_map: dict[str, int] = {}
    #: Labels of ports to forward to their ``to`` port (like the docker driver's ``ports``).
    ports: list[str] = []
    args: list[str] = []
    #: Start from this memory snapshot (``vmdriver snapshot``; docs/snapshots.md).
    snapshot: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    #: A stop saves the guest's state; the next start of the task resumes it.
    suspend: bool = False
    #: A vmgenid device, so clones of this VM's snapshots get a fresh generation id.
    vmgenid: bool = False
    # Seed-era keys (Nomad 0.1), accepted with a deprecation warning.
    image_source: str | None = None
    checksum: str | None = None
    host_port: int | None = None
    guest_port: int | None = None


_LEGACY = ("image_source", "checksum", "host_port", "guest_port")


def _normalize_port_map(raw: Any) -> Any:
    # HCL gives a block as a list of dicts; Nomad also accepted a JSON list form.
    if isinstance(raw, list):
        merged: dict[str, Any] = {}
        for item in raw:
            if not isinstance(item, dict):
                return raw
            merged.update(item)
        return merged
    return raw


def parse_config(raw: dict[str, Any], where: str) -> QemuTaskConfig:
    """Validate a raw config mapping; errors name the field and what is allowed."""
    data = dict(raw)
    if "port_map" in data:
        data["port_map"] = _normalize_port_map(data["port_map"])
    try:
        cfg = QemuTaskConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        allowed = ""
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(QemuTaskConfig.model_fields)
            raise SpecError("unknown config key", where=f"{where}.config.{loc}",
                            allowed=allowed) from None
        if err["type"] == "enum":
            allowed = str(err.get("ctx", {}).get("expected", ""))
        raise SpecError(err["msg"].lower(), where=f"{where}.config.{loc}",
                        value=err.get("input"), allowed=allowed) from None
    used = [k for k in _LEGACY if getattr(cfg, k) is not None]
    if used:
        log.warning("%s: config keys %s are deprecated (Nomad 0.1); use an artifact block "
                    "and port_map instead", where, ", ".join(used))
    if not cfg.image_path and not cfg.image_source:
        raise SpecError("image_path must be set", where=f"{where}.config.image_path")
    return cfg


def legacy_artifacts(cfg: QemuTaskConfig) -> tuple[ArtifactSpec, ...]:
    """``image_source``/``checksum`` as the artifact they always meant."""
    if not cfg.image_source:
        return ()
    options = (("checksum", f"md5:{cfg.checksum}"),) if cfg.checksum else ()
    return (ArtifactSpec(source=cfg.image_source, destination="local/", mode="file",
                         options=options),)


def _forwards(cfg: QemuTaskConfig, inputs: TaskInputs) -> list[PortForward]:
    by_label = {p.label: p for p in inputs.ports}
    out: list[PortForward] = []
    for label, guest in sorted(cfg.port_map.items()):
        port = by_label.get(label)
        if port is None:
            raise SpecError(f"port_map label {label!r} is not a declared port",
                            where=f"{inputs.where}.config.port_map.{label}",
                            allowed=sorted(by_label) or "no ports declared")
        guest_port = parse_port(guest, where=f"{inputs.where}.config.port_map.{label}")
        out.append(PortForward(label=label, host_port=port.host_port, guest_port=guest_port))
    for label in cfg.ports:
        port = by_label.get(label)
        if port is None:
            raise SpecError(f"ports label {label!r} is not a declared port",
                            where=f"{inputs.where}.config.ports", allowed=sorted(by_label))
        if label not in cfg.port_map:
            out.append(PortForward(label=label, host_port=port.host_port,
                                   guest_port=port.to or port.host_port))
    if cfg.host_port is not None and cfg.guest_port is not None:
        out.append(PortForward(
            label="legacy",
            host_port=parse_port(cfg.host_port, where=f"{inputs.where}.config.host_port"),
            guest_port=parse_port(cfg.guest_port, where=f"{inputs.where}.config.guest_port"),
        ))
    return out


#: Where a writable drive on a shared image writes instead (relative: in the task dir).
OVERLAY = ".image0.overlay.qcow2"


def _own(image: str, env: dict[str, str]) -> bool:
    """True if ``image`` is the task's own file (relative, or in its task or alloc dir).

    Anything else can only be under the operator's ``image_paths``, shared by other
    jobs. Read from the paths Nomad (or `vmdriver run`) gave the task; without them
    every absolute path counts as shared, which costs an overlay, never an image.
    """
    if not os.path.isabs(image):
        return True
    norm = os.path.normpath(image)
    task_dir = os.path.dirname(env.get("NOMAD_TASK_DIR", "").rstrip("/"))
    dirs = [d for d in (task_dir, env.get("NOMAD_ALLOC_DIR", "")) if os.path.isabs(d)
            and d != "/"]
    return any(norm == d or norm.startswith(d.rstrip("/") + "/") for d in dirs)


def _medium(image: str, kind: str, env: dict[str, str]) -> FileMedium:
    """The image itself, or a per-task qcow2 overlay on it when it is shared and written."""
    if kind == "cdrom" or _own(image, env):
        return FileMedium(path=image)
    # The runtime makes the overlay before launch (kept across restarts); QEMU then opens
    # the shared image only as a read-only backing file.
    return FileMedium(path=OVERLAY, format="qcow2", overlay_on=image)


def _drives(cfg: QemuTaskConfig, image: str, env: dict[str, str]) -> tuple[Drive, ...]:
    """The image as Nomad's qemu driver attaches it, with the guest view unchanged.

    The drive is a ``-blockdev`` + ``-device`` now; on the buses that have no
    device form it stays ``-drive if=``. An ISO boots as a CD (El Torito) where
    the bus can carry one; Nomad's plain disk drive only boots hybrid ISOs. A
    disk on a shared image (under ``image_paths``) writes to a per-task overlay.
    """
    bus = _BUSES[cfg.drive_interface]
    cd_bus = bus in (Bus.IDE, Bus.LEGACY_SCSI)
    kind: Literal["disk", "cdrom"] = "cdrom" if cd_bus and image.lower().endswith(".iso") else "disk"
    drives = [Drive(id="image0", medium=_medium(image, kind, env), bus=bus, kind=kind,
                    index=0 if bus is Bus.IDE else None, origin="config.image_path")]
    if bus is Bus.IDE and "-nodefaults" not in cfg.args and kind == "disk":
        # `-drive if=ide` leaves QEMU's default empty CD-ROM on ide.1 in place;
        # `-device ide-hd` removes it. Keep it, so the guest sees what it saw under Nomad.
        drives.append(Drive(id="cdrom0", kind="cdrom", bus=Bus.IDE, index=2))
    return tuple(drives)


def build_spec(cfg: QemuTaskConfig, inputs: TaskInputs) -> VMSpec:
    """Map a validated qemu task config plus task facts into the canonical spec."""
    shutdown = stop_policy(inputs, graceful=cfg.graceful_shutdown,
                           via_agent=cfg.guest_agent_shutdown and cfg.guest_agent)
    check_dns(inputs)
    image = cfg.image_path or "local/" + (cfg.image_source or "").rstrip("/").rsplit("/", 1)[-1]
    forwards = _forwards(cfg, inputs)
    nics: tuple[UserNic, ...] = ()
    if forwards or inputs.dns_servers or inputs.dns_searches:
        nics = (UserNic(id="net0", forwards=tuple(forwards), dns_servers=inputs.dns_servers,
                        dns_searches=inputs.dns_searches),)
    return VMSpec(
        name=inputs.name,
        display_name=image.rstrip("/").rsplit("/", 1)[-1],
        emulator=normalize_emulator(cfg.emulator),
        machine_type=cfg.machine_type,
        accelerator=cfg.accelerator,
        drives=_drives(cfg, image, inputs.env),
        nics=nics,
        resources=task_resources(inputs),
        shutdown=shutdown,
        guest_agent=cfg.guest_agent,
        balloon=cfg.balloon,
        args=tuple(cfg.args),
        snapshot=cfg.snapshot,
        suspend=cfg.suspend,
        vmgenid="auto" if cfg.vmgenid or cfg.suspend else None,
    )
