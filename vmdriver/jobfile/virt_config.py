"""The ``driver = "virt"`` task config: nomad-driver-virt's fields, validated strictly.

The same body reaches us two ways: python-hcl2 from a job file (every block a
list of bodies) and Nomad's msgpack (a ``Block`` an object, a ``BlockList`` a
list, every unset attribute ``nil``). :func:`parse_config` folds both into one
shape, then validates; every error is one line naming the task, the field, the
value and what is allowed, as the qemu dialect's are.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vmdriver.errors import SpecError
from vmdriver.host.emulators import normalize_emulator
from vmdriver.storage import DiskRequest, parse_disks

#: Machine types a virt task may ask for: the two x86 machines (versioned too), Arm's ``virt``.
MACHINE_PATTERN = r"^(pc|q35|pc-i440fx-\d{1,2}\.\d{1,2}|pc-q35-\d{1,2}\.\d{1,2}|virt(-\d{1,2}\.\d{1,2})?)$"
#: ``platform.machine()`` names that differ from QEMU's emulator suffix.
_HOST_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}
#: Single blocks (``os {}``, ``bridge {}``): python-hcl2 gives a list of one body.
_ONE_BLOCK = ("os", "bridge", "macvtap")


def host_arch() -> str:
    """The emulator suffix of this host's own architecture (``x86_64``, ``aarch64``)."""
    machine = platform.machine().lower()
    return _HOST_ARCH.get(machine, machine)


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class OsConfig(_Block):
    """``os { arch, machine }``: what machine to emulate."""

    arch: str = Field(default_factory=host_arch, pattern=r"^[a-z0-9_]{1,32}$")
    machine: str = Field(default="pc", pattern=MACHINE_PATTERN)


class BridgeConfig(_Block):
    """``bridge { name, ports }``: a tap on a host bridge; ``ports`` are job port labels."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,15}$")
    ports: list[str] = []


class MacvtapConfig(_Block):
    """``macvtap { device, mode }``: a macvtap on a host device."""

    device: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,15}$")
    mode: Literal["bridge", "private", "vepa", "passthrough"] = "bridge"


class NetworkInterface(_Block):
    """One ``network_interface { bridge {} | macvtap {} }``."""

    bridge: BridgeConfig | None = None
    macvtap: MacvtapConfig | None = None

    def model_post_init(self, _context: object) -> None:
        if (self.bridge is None) == (self.macvtap is None):
            raise ValueError("a network_interface needs exactly one of bridge or macvtap")


class VirtTaskConfig(BaseModel):
    """Fields of a virt task's ``config {}``; unknown keys are errors, as in Nomad."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    #: ``disk`` blocks, validated by :func:`vmdriver.storage.parse_disks`.
    disk: list[dict[str, Any]] = []
    os: OsConfig = OsConfig()
    hostname: str | None = None
    cmds: list[str] = []
    default_user_password: str | None = Field(default=None, repr=False)
    default_user_authorized_ssh_key: str | None = None
    #: A cloud-init user-data file in the task dir.
    user_data: str | None = None
    timezone: str | None = None
    network_interface: list[NetworkInterface] = []
    # vmdriver's own (docs/snapshots.md): start from a memory snapshot, suspend on stop,
    # a vmgenid device for a template whose clones must not share its RNG state.
    snapshot: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    suspend: bool = False
    vmgenid: bool = False

    @field_validator("os", mode="before")
    @classmethod
    def _os(cls, value: Any) -> Any:
        return OsConfig() if value is None else value


@dataclass(frozen=True)
class VirtConfig:
    """A validated virt task config with its disks settled (primary, devnames, defaults)."""

    task: VirtTaskConfig
    disks: tuple[DiskRequest, ...]

    @property
    def emulator(self) -> str:
        """``qemu-system-<emulator>``."""
        return normalize_emulator(self.task.os.arch)


def _drop_nulls(value: Any) -> Any:
    """Nomad sends every unset attribute as nil; an unset field is an absent one."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _single_blocks(value: Any) -> Any:
    """``[{...}]`` (python-hcl2) → ``{...}`` for the blocks that appear at most once."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            one = key in _ONE_BLOCK and isinstance(item, list) and len(item) <= 1
            out[key] = _single_blocks((item[0] if item else None) if one else item)
        return out
    if isinstance(value, list):
        return [_single_blocks(v) for v in value]
    return value


def _normalize(raw: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = _drop_nulls(dict(raw))
    disks = data.pop("disk", None)  # disk bodies stay as given: parse_disks reads them
    data = _single_blocks(data)
    if isinstance(data.get("network_interface"), dict):
        data["network_interface"] = [data["network_interface"]]
    if disks is not None:
        data["disk"] = disks if isinstance(disks, list) else [disks]
    return data


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_BLOCKS: dict[str, type[BaseModel]] = {
    "os": OsConfig, "network_interface": NetworkInterface, "bridge": BridgeConfig,
    "macvtap": MacvtapConfig}


def _fields_of(loc: tuple[int | str, ...]) -> str:
    """The fields allowed where an unknown key was found."""
    model: type[BaseModel] = VirtTaskConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        sub = _BLOCKS.get(str(part))
        if sub is not None:
            model = sub
    return ", ".join(model.model_fields)


def parse_config(raw: dict[str, Any], where: str) -> VirtConfig:
    """Validate a raw virt config mapping; SpecError names the task, field, value and allowed."""
    data = _normalize(raw)
    base = f"{where}.config"
    try:
        cfg = VirtTaskConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _location(tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            raise SpecError("unknown config key", where=f"{base}.{loc}",
                            allowed=_fields_of(tuple(err["loc"]))) from None
        msg = str(err["msg"]).removeprefix("Value error, ")
        allowed = str(err.get("ctx", {}).get("expected", "")) if err["type"] in (
            "literal_error", "enum") else ""
        if err["type"] == "string_pattern_mismatch":
            msg, allowed = "value not allowed", _pattern_help(loc)
        value = None if err["type"] in ("value_error", "missing") else err.get("input")
        raise SpecError(msg[:1].lower() + msg[1:], where=f"{base}.{loc}", value=value,
                        allowed=allowed) from None
    disks = parse_disks(cfg.disk, f"{base}.disk")
    if not disks:
        raise SpecError("a virt task needs at least one disk", where=f"{base}.disk",
                        allowed="disk { source { image = \"local/disk.qcow2\" } }")
    if cfg.default_user_password is not None and (
            not cfg.default_user_password or any(c in cfg.default_user_password for c in "\r\n\0")):
        # The value is a secret: never echoed.
        raise SpecError("the password must be non-empty, without newline or NUL",
                        where=f"{base}.default_user_password")
    return VirtConfig(cfg, disks)


def _pattern_help(loc: str) -> str:
    field = loc.rsplit(".", 1)[-1]
    return {
        "machine": "pc, q35 (or versioned pc-i440fx-X.Y, pc-q35-X.Y); virt on Arm",
        "arch": "an emulator name like x86_64 or aarch64",
        "name": "a bridge name: 1-15 of letters, digits, '_', '.', '-'",
        "device": "a host device name: 1-15 of letters, digits, '_', '.', '-'",
    }.get(field, "")
