"""The ``driver = "qemu"`` task config, and its mapping into a :class:`VMSpec`.

Both faces that take Nomad tasks use :func:`build_spec`: `vmdriver run` after
reading a job file, the Nomad plugin after decoding StartTask's msgpack.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vmdriver.errors import SpecError
from vmdriver.host.emulators import normalize_emulator
from vmdriver.spec import (
    Accelerator,
    ArtifactSpec,
    Drive,
    DriveInterface,
    NetworkSpec,
    PortForward,
    Resources,
    ShutdownPolicy,
    VMSpec,
)
from vmdriver.units import check_hostname, parse_port

log = logging.getLogger(__name__)

#: Nomad bounds on ``resources.memory`` (MB) for the qemu driver.
MIN_MEMORY_MB = 128
MAX_MEMORY_MB = 4_000_000
_SIGNALS = ("SIGINT", "SIGTERM", "SIGQUIT", "SIGHUP", "SIGKILL", "SIGUSR1", "SIGUSR2")


class QemuTaskConfig(BaseModel):
    """Fields of a qemu task's ``config {}``; unknown keys are errors, as in Nomad."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    image_path: str | None = None
    emulator: str = "x86_64"
    machine_type: str = Field(default="pc", pattern=r"^[A-Za-z0-9_.,=-]{1,128}$")
    accelerator: Accelerator = Field(default=Accelerator.TCG, strict=False)
    drive_interface: DriveInterface = Field(default=DriveInterface.IDE, strict=False)
    graceful_shutdown: bool = False
    guest_agent: bool = False
    port_map: dict[str, int] = {}
    #: Labels of ports to forward to their ``to`` port (like the docker driver's ``ports``).
    ports: list[str] = []
    args: list[str] = []
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


@dataclass(frozen=True)
class AllocatedPort:
    """A port the scheduler (or `vmdriver run`) gave the task."""

    label: str
    host_port: int
    to: int | None = None


@dataclass(frozen=True)
class TaskInputs:
    """What a face knows about a task besides its config."""

    name: str
    where: str
    memory_mb: int = 300
    memory_max_mb: int | None = None
    cores: int | None = None
    cpu_shares: int | None = None
    cpuset: tuple[int, ...] = ()
    kill_timeout_s: float = 5.0
    kill_signal: str = "SIGINT"
    env: dict[str, str] = field(default_factory=dict)
    ports: tuple[AllocatedPort, ...] = ()
    dns_servers: tuple[str, ...] = ()
    dns_searches: tuple[str, ...] = ()
    #: Host memory in MB, the upper bound for ``memory``.
    host_memory_mb: int | None = None


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


def _resources(inputs: TaskInputs) -> Resources:
    where = f"{inputs.where}.resources"
    top = min(MAX_MEMORY_MB, inputs.host_memory_mb or MAX_MEMORY_MB)
    if not MIN_MEMORY_MB <= inputs.memory_mb <= top:
        raise SpecError("memory out of bounds", where=f"{where}.memory", value=inputs.memory_mb,
                        allowed=f"{MIN_MEMORY_MB} to {top} (MB)")
    mmax = inputs.memory_max_mb
    if mmax is not None and mmax not in (0, -1) and mmax < inputs.memory_mb:
        raise SpecError("memory_max is below memory", where=f"{where}.memory_max", value=mmax,
                        allowed=f">= {inputs.memory_mb}, or -1 for no limit")
    if inputs.cores is not None and not 1 <= inputs.cores <= 1024:
        raise SpecError("cores out of bounds", where=f"{where}.cores", value=inputs.cores,
                        allowed="1 to 1024")
    return Resources(
        memory_mib=inputs.memory_mb,
        memory_max_mib=mmax if mmax and mmax > 0 else None,
        cores=inputs.cores,
        cpu_shares=inputs.cpu_shares,
        cpuset=inputs.cpuset,
    )


def build_spec(cfg: QemuTaskConfig, inputs: TaskInputs) -> VMSpec:
    """Map a validated qemu task config plus task facts into the canonical spec."""
    signal = inputs.kill_signal.upper()
    signal = signal if signal.startswith("SIG") else f"SIG{signal}"
    if signal not in _SIGNALS:
        raise SpecError("unsupported kill_signal", where=f"{inputs.where}.kill_signal",
                        value=inputs.kill_signal, allowed=_SIGNALS)
    for server in inputs.dns_servers:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise SpecError("not an IP address", where=f"{inputs.where}.network.dns.servers",
                            value=server) from None
    for search in inputs.dns_searches:
        check_hostname(search, where=f"{inputs.where}.network.dns.searches")
    image = cfg.image_path or "local/" + (cfg.image_source or "").rstrip("/").rsplit("/", 1)[-1]
    forwards = _forwards(cfg, inputs)
    network = None
    if forwards or inputs.dns_servers or inputs.dns_searches:
        network = NetworkSpec(forwards=tuple(forwards), dns_servers=inputs.dns_servers,
                              dns_searches=inputs.dns_searches)
    # An ISO boots as a CD (El Torito) where the bus can carry one; Nomad's plain
    # disk drive only boots hybrid ISOs.
    cd_bus = cfg.drive_interface in (DriveInterface.IDE, DriveInterface.SCSI)
    media: Literal["disk", "cdrom"] = (
        "cdrom" if cd_bus and image.lower().endswith(".iso") else "disk"
    )
    return VMSpec(
        name=inputs.name,
        display_name=image.rstrip("/").rsplit("/", 1)[-1],
        emulator=normalize_emulator(cfg.emulator),
        machine_type=cfg.machine_type,
        accelerator=cfg.accelerator,
        drives=(Drive(path=image, interface=cfg.drive_interface, media=media),),
        network=network,
        resources=_resources(inputs),
        shutdown=ShutdownPolicy(graceful=cfg.graceful_shutdown, timeout_s=inputs.kill_timeout_s,
                                signal=signal),
        guest_agent=cfg.guest_agent,
        args=tuple(cfg.args),
        env=tuple(sorted(inputs.env.items())),
    )
