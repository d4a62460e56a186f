"""The runner's config file: VM-Operator's ``/Runner`` section, checked strictly.

The file (default :data:`DEFAULT_CONFIG`, ``-c`` to change it) looks like::

    "/Runner":
      dataDir: /var/local/vm-data       # default: $XDG_DATA_HOME/vmrunner/<name> ...
      template: standard.j2
      vm:
        name: test-vm
        firmware: uefi                  # bios | uefi | uefi-4m | secure | secure-4m
        maximumRam: 4 GiB               # 4G, 4Gi, 4 GiB, 4294967296
        currentRam: 2 GiB
        maximumCpus: 4
        currentCpus: 2
        network: [{type: tap, bridge: br0}]
        drives:
          - {type: raw, resource: /dev/vg/test-vm}
          - {type: ide-cd, file: /srv/iso/debian.iso, bootindex: 1}
        display: {spice: {port: 5910}}

Keys, defaults and directory fallbacks are VM-Operator's (the Java field names where
its sample file and its code disagree). Unlike VM-Operator, an unknown key or a bad
value is an error naming the key (see :mod:`vmdriver.runner.keys`), sizes take
``1G``/``1Gi``/``1 GiB``/bytes, and an explicit ``runtimeDir`` works.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from vmdriver.errors import InputError, SpecError
from vmdriver.runner.keys import check_keys, unknown_key
from vmdriver.units import parse_duration, parse_size

log = logging.getLogger(__name__)

#: Where VM-Operator's runner reads its config unless ``-c`` says otherwise.
DEFAULT_CONFIG = Path("/etc/opt/vmrunner/config.yaml")
#: The one top-level key (JGrapes' component path convention).
SECTION = "/Runner"
#: VM-Operator's default template name; read as our standard template.
VMOP_DEFAULT_TEMPLATE = "Standard-VM-latest.ftl.yaml"
DEFAULT_TEMPLATE = "standard.j2"

Firmware = Literal["bios", "uefi", "uefi-4m", "secure", "secure-4m"]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", re.ASCII)
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$", re.IGNORECASE | re.ASCII)
_DEVICE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$", re.ASCII)
_RTC_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}:\d{2})?$", re.ASCII)
#: A value QEMU reads inside a comma-separated option list must not hold a comma.
_NO_COMMA = "must not contain ',' (QEMU would read the rest as another option)"


class Model(BaseModel):
    """Frozen, camelCase keys only (``dataDir``, not ``data_dir``), unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel,
                              validate_by_name=False, validate_by_alias=True)


def _size(value: Any) -> int | None:
    """A size in bytes from ``1G``, ``1Gi``, ``1 GiB`` or a byte count."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except InputError as exc:
        raise ValueError(f"{exc.message}: {value!r} (a byte count or a size like 1G, 1Gi, 1 GiB)"
                         ) from None


def _plain(value: str, what: str) -> str:
    if "," in value or "\x00" in value or not value.strip():
        raise ValueError(f"{what} {value!r} {_NO_COMMA}" if "," in value else f"empty {what}")
    return value


class Network(Model):
    """One NIC: ``tap`` (a bridge through qemu-bridge-helper) or ``user`` (SLIRP)."""

    type: Literal["tap", "user"] = "tap"
    #: The host bridge of a tap NIC; none means qemu-bridge-helper's default (br0).
    bridge: str | None = None
    #: The QEMU NIC model.
    device: str = "virtio-net"
    mac: str | None = None
    #: The guest network of a user NIC, e.g. ``10.0.2.0/24``.
    net: str | None = None

    @field_validator("bridge")
    @classmethod
    def _bridge(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            if info.data.get("type") == "user":
                raise ValueError("a user network has no bridge")
            if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,15}", value):
                raise ValueError(f"not a bridge name: {value!r} (1-15 letters, digits, _.:-)")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError(f"not a QEMU NIC model: {value!r} (e.g. virtio-net, e1000e)")
        return value

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        if value is not None and not _MAC_RE.match(value):
            raise ValueError(f"not a MAC address: {value!r} (like 52:54:00:12:34:56)")
        return value

    @field_validator("net")
    @classmethod
    def _net(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if info.data.get("type") != "user":
            raise ValueError("only a user network has a net")
        try:
            ipaddress.IPv4Network(value, strict=False)
        except ValueError:
            raise ValueError(f"not an IPv4 network: {value!r} (like 10.0.2.0/24)") from None
        return value


class Drive(Model):
    """A disk (``raw``: a file or a block device) or an IDE CD-ROM (``ide-cd``)."""

    type: Literal["raw", "ide-cd"] = "raw"
    bootindex: StrictInt | None = Field(default=None, ge=0)
    #: A host file (a raw image, or a CD's ISO; empty for an empty CD drive).
    file: str | None = None
    #: A host block device.
    device: str | None = None
    #: A file or a block device, decided when the VM starts (VM-Operator's ``resource``).
    resource: str | None = None

    @field_validator("file", "device", "resource")
    @classmethod
    def _path(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or (value == "" and info.field_name == "file"):
            return value  # an empty CD-ROM file means an empty drive
        return _plain(value, "path")

    @model_validator(mode="after")
    def _one_source(self) -> Drive:
        given = [k for k in ("file", "device", "resource") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of file, device, resource (got {', '.join(given)})")
        if not given and self.type == "raw":
            raise ValueError("a raw drive needs a file, device or resource")
        return self


class Spice(Model):
    """The SPICE display server."""

    port: StrictInt = Field(default=5900, ge=1, le=65535)
    #: Deprecated in VM-Operator (written to ticket.txt, used by no template).
    ticket: str | None = None
    streaming_video: Literal["off", "all", "filter"] | None = None
    usb_redirects: StrictInt = Field(default=2, ge=0, le=15)


class Display(Model):
    """Video outputs, the auto-login user and SPICE (absent: no SPICE)."""

    outputs: StrictInt = Field(default=1, ge=1, le=16)
    logged_in_user: str | None = None
    spice: Spice | None = None


class Vm(Model):
    """The ``vm`` section: what the template renders into a VM."""

    name: str
    uuid: str | None = None
    use_tpm: StrictBool = False
    firmware: Firmware = "uefi"
    boot_menu: StrictBool = False
    #: Seconds a graceful shutdown may take before QEMU is terminated.
    powerdown_timeout: int = 900
    #: Bytes; ``None`` lets the template pick (1 GiB in the standard one).
    maximum_ram: int | None = None
    #: Bytes the balloon aims at; ``None``: no ballooning.
    current_ram: int | None = None
    cpu_model: str = "host"
    current_cpus: StrictInt = Field(default=1, ge=1, le=1024)
    #: Raised to ``currentCpus`` when lower, as VM-Operator does.
    maximum_cpus: StrictInt = Field(default=1, ge=1, le=1024, validate_default=True)
    sockets: StrictInt = Field(default=0, ge=0)
    dies_per_socket: StrictInt = Field(default=0, ge=0)
    cores_per_die: StrictInt = Field(default=0, ge=0)
    threads_per_core: StrictInt = Field(default=0, ge=0)
    #: ``none`` leaves the choice to QEMU; ``auto`` is vmdriver's KVM-where-it-works.
    accelerator: Literal["kvm", "tcg", "auto", "none"] = "kvm"
    rtc_base: str = "utc"
    rtc_clock: Literal["host", "rt", "vm"] = "rt"
    #: VM-Operator's default: one tap NIC on qemu-bridge-helper's default bridge.
    network: tuple[Network, ...] = (Network(),)
    drives: tuple[Drive, ...] = ()
    display: Display = Display()
    #: vmdriver's own: start from this memory snapshot (docs/snapshots.md).
    snapshot: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"not a VM name: {value!r} (1-63 letters, digits, '.', '_', '-'; "
                             "it names the data and runtime dirs)")
        return value

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(UUID(value))
        except ValueError:
            raise ValueError(f"not a UUID: {value!r} (like 3c0a51c4-...-8a8e9ff3c4a1)") from None

    @field_validator("powerdown_timeout", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> int:
        try:
            return round(parse_duration(value))
        except InputError as exc:
            raise ValueError(f"{exc.message}: {value!r} (seconds, or a duration like 15m)"
                             ) from None

    @field_validator("maximum_ram", "current_ram", mode="before")
    @classmethod
    def _ram(cls, value: Any) -> int | None:
        size = _size(value)
        if size is not None and size < 16 * 1024 * 1024:
            raise ValueError(f"{value!r} is less than the 16 MiB a guest needs to start")
        return size

    @field_validator("current_ram")
    @classmethod
    def _current_ram(cls, value: int | None, info: ValidationInfo) -> int | None:
        top = info.data.get("maximum_ram") or 1 << 30
        if value is not None and value > top:
            raise ValueError(f"{value} bytes is more than maximumRam ({top} bytes)")
        return value

    @field_validator("maximum_cpus")
    @classmethod
    def _maximum_cpus(cls, value: int, info: ValidationInfo) -> int:
        return max(value, info.data.get("current_cpus") or 1)

    @field_validator("cpu_model")
    @classmethod
    def _cpu_model(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
            raise ValueError(f"not a CPU model: {value!r} (e.g. host, max, Skylake-Server)")
        return value

    @field_validator("rtc_base")
    @classmethod
    def _rtc_base(cls, value: str) -> str:
        if value not in ("utc", "localtime") and not _RTC_DATE_RE.match(value):
            raise ValueError(f"not an RTC base: {value!r} (utc, localtime, or a date like "
                             "2006-06-17 or 2006-06-17T16:01:21)")
        return value


class CloudInit(Model):
    """NoCloud data: written to ``<dataDir>/cloud-init/`` and packed into an image."""

    meta_data: dict[str, Any] | None = None
    user_data: dict[str, Any] | None = None
    network_config: dict[str, Any] | None = None


class RunnerConfig(Model):
    """The ``/Runner`` section."""

    data_dir: Path | None = None
    runtime_dir: Path | None = None
    template: str = DEFAULT_TEMPLATE
    update_template: StrictBool = False
    #: Kubernetes namespace (development only; read from the service account otherwise).
    namespace: str | None = None
    cloud_init: CloudInit | None = None
    guest_shutdown_stops: StrictBool = False
    #: Increase it while the VM runs to reset the VM.
    reset_counter: StrictInt | None = None
    vm: Vm

    @field_validator("data_dir", "runtime_dir", mode="before")
    @classmethod
    def _dir(cls, value: Any) -> Any:
        if isinstance(value, str) and (not value.strip() or "\x00" in value):
            raise ValueError("expected a directory path")
        return value

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        if value == VMOP_DEFAULT_TEMPLATE:
            log.warning("template %r is VM-Operator's FreeMarker template; using %r, its "
                        "Jinja2 equivalent", value, DEFAULT_TEMPLATE)
            return DEFAULT_TEMPLATE
        if value.endswith((".ftl", ".ftl.yaml")):
            raise ValueError(f"{value!r} is a FreeMarker template; the runner renders Jinja2 "
                             f"templates (the standard one is {DEFAULT_TEMPLATE!r})")
        if "/" in value or value.startswith(".") or "\x00" in value:
            raise ValueError(f"not a template name: {value!r} (a file name in the template "
                             "directory)")
        return value


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _spec_error(exc: ValidationError, file: str) -> SpecError:
    """The first of pydantic's errors as one line naming the key."""
    err = exc.errors()[0]
    # Union members add their type name to loc ("function-after[...]"); keep real keys.
    loc = tuple(p for p in err["loc"] if isinstance(p, int) or "[" not in p)
    where = f"{file}: {_loc(loc)}" if loc else file
    if err["type"] == "missing":
        return SpecError("required key is missing", where=where)
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] in ("value_error", "assertion_error"):
        return SpecError(msg, where=where)
    return SpecError(msg[:1].lower() + msg[1:], where=where, value=err.get("input"))


def parse_config(data: Any, file: str) -> RunnerConfig:
    """Validate a parsed YAML document; ``file`` names it in errors."""
    if not isinstance(data, dict):
        raise SpecError(f"expected a mapping with the key {SECTION!r}", where=file)
    for key in data:
        if key != SECTION:
            raise unknown_key(str(key), [SECTION], f"{file}: {key}")
    body = data.get(SECTION)
    if not isinstance(body, dict):
        raise SpecError("expected a mapping of runner settings", where=f"{file}: {SECTION}",
                        value=None if body is None else type(body).__name__)
    body = check_keys(body, RunnerConfig, "", file)
    try:
        return RunnerConfig.model_validate(body)
    except ValidationError as exc:
        raise _spec_error(exc, file) from None


def load_config(path: Path = DEFAULT_CONFIG) -> RunnerConfig:
    """Read and validate the runner config file (YAML)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read the runner config: {getattr(exc, 'strerror', None) or exc}",
                        where=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise SpecError(f"not valid YAML: {problem}", where=where) from None
    return parse_config(data, str(path))
