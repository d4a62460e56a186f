"""The operator's host configuration: the body of the Nomad plugin's ``config {}`` block.

The same fields reach vmdriver three ways: ``vmdriver run --host-config FILE``
(an HCL file holding that body), the Nomad plugin's SetConfig (msgpack), and
defaults when neither is given. ``vmdriver run`` and ``vmdriver argv`` read
:data:`DEFAULT_HOST_CONFIG` when it exists and no ``--host-config`` is given.

Example (``/etc/vmdriver/host.hcl``)::

    image_paths         = ["/srv/images"]
    args_allowlist      = ["-device", "-fw_cfg", "-smp"]
    emulators_allowlist = ["x86_64"]
    state_dir           = "/var/lib/vmdriver"
    sandbox             = true

Every field is checked here, so a typo is one error line naming the field
rather than a policy that silently allows more than the operator meant.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from vmdriver.errors import HostConfigError, InputError
from vmdriver.units import DURATION_HELP, SIZE_HELP, parse_duration, parse_size

#: Where `vmdriver run` and `vmdriver argv` look for a host config when none is given.
DEFAULT_HOST_CONFIG = Path("/etc/vmdriver/host.hcl")

#: An allowlisted QEMU flag: one or two dashes (optional) and an option name.
_FLAG_RE = re.compile(r"^-{0,2}[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", re.ASCII)
_EMULATOR_RE = re.compile(r"^[a-z0-9_]{1,32}$", re.ASCII)
_EMULATOR_PREFIX = "qemu-system-"
#: Bytes a task dir's socket path needs beyond the state dir, with a one-letter task
#: name: ``/allocs/<8 hex>/t/qmp.sock``. Longer task names are checked per task.
_SOCKET_SUFFIX = len("/allocs/12345678/t/qmp.sock")
_MAX_SOCKET_PATH = 107


def default_state_dir() -> Path:
    """Root-owned runs keep state in /var/lib; others under XDG_STATE_HOME."""
    if os.geteuid() == 0:
        return Path("/var/lib/vmdriver")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "vmdriver"


def _string_list(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ValueError(f"expected a list of {what}")  # noqa: TRY004 (pydantic wants ValueError)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"item {i} is not a string: {item!r}")  # noqa: TRY004
        if "\x00" in item:
            raise ValueError(f"item {i} holds a NUL byte")
    return tuple(value)


class HostConfig(BaseModel):
    """Operator settings, trusted (jobs are not).

    An empty ``args_allowlist`` is not "everything" (Nomad's qemu driver's reading):
    a job's args may then use only the documented safe set of options and keys
    (:mod:`vmdriver.policy.safeset`); with an allowlist, the listed options, their
    paths still checked. An empty ``emulators_allowlist`` allows every emulator.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Absolute host directories images (and paths in args) may come from,
    #: besides the task and alloc dirs.
    image_paths: tuple[str, ...] = ()
    #: QEMU flags a job's ``args`` may use (``-drive`` or ``drive``); empty allows every
    #: flag except the refused-unless-listed ones.
    args_allowlist: tuple[str, ...] = ()
    #: Emulators (``x86_64`` or ``qemu-system-x86_64``) jobs may use; empty allows all.
    emulators_allowlist: tuple[str, ...] = ()
    #: Where task directories, sockets and logs of `vmdriver run` live.
    state_dir: Path = Field(default_factory=default_state_dir)
    #: Apply QEMU's seccomp sandbox (``-sandbox on,...``) where this QEMU supports it.
    sandbox: StrictBool = True
    #: Size limit of the shared artifact cache (least recently used entries go first),
    #: e.g. ``20GiB``; entries a running task's overlay uses are never evicted.
    artifact_cache_max: str = "20GiB"
    # The sections below belong to higher layers (storage, networking) that validate
    # them when a face loads the config (vmdriver.jobfile.hostcheck): kept raw here,
    # so this bottom layer does not import them.
    #: nomad-driver-virt's ``storage_pools { default, directory "x" {}, ceph "y" {} }``.
    storage_pools: Any = None
    #: nomad-driver-virt's ``provider "libvirt" { uri, user, password }``: accepted,
    #: reported as unavailable in this backend when a virt task starts.
    provider: Any = None
    #: Managed networks: ``network "default" { bridge, subnet, dhcp, nat }``.
    network: Any = None
    #: Host bridges (besides managed ones) and host devices (macvtap) jobs may use.
    allowed_bridges: tuple[str, ...] = ()
    allowed_devices: tuple[str, ...] = ()
    #: How long the Nomad plugin's StartTask waits for a guest's address on a tap
    #: NIC (for Nomad's DriverNetwork) before it starts the task without one.
    address_wait: str = "30s"
    #: Accelerator of virt tasks (which have no field for it): ``auto`` uses KVM only
    #: where the KVM probe booted a kernel.
    virt_accelerator: Literal["auto", "kvm", "tcg"] = "auto"
    #: QEMU in a jail (its own uid, no capabilities, a mount namespace of its own files):
    #: ``required`` refuses to start a VM where this host cannot build one, ``preferred``
    #: starts it unjailed with a warning, ``off`` never jails (and says so).
    jail: Literal["required", "preferred", "off"] = "preferred"
    #: ``HOST:PORT`` of a Prometheus endpoint with the VMs' metrics (docs/metrics.md);
    #: empty: none.
    metrics_address: str = ""

    @field_validator("image_paths", mode="before")
    @classmethod
    def _image_paths(cls, value: Any) -> tuple[str, ...]:
        paths = _string_list(value, "absolute directory paths")
        for i, path in enumerate(paths):
            if not path.strip() or not Path(path).is_absolute():
                raise ValueError(f"item {i} is not an absolute path: {path!r} (relative "
                                 "entries would never match)")
        return paths

    @field_validator("args_allowlist", mode="before")
    @classmethod
    def _args_allowlist(cls, value: Any) -> tuple[str, ...]:
        flags = _string_list(value, "QEMU flags like -device")
        for i, flag in enumerate(flags):
            if not _FLAG_RE.match(flag.strip()):
                raise ValueError(f"item {i} is not a QEMU flag: {flag!r} (expected a flag "
                                 "like -device, without a value)")
        return flags

    @field_validator("allowed_bridges", "allowed_devices", mode="before")
    @classmethod
    def _ifnames(cls, value: Any) -> tuple[str, ...]:
        return _string_list(value, "interface names")

    @field_validator("emulators_allowlist", mode="before")
    @classmethod
    def _emulators(cls, value: Any) -> tuple[str, ...]:
        names = _string_list(value, "emulator names like x86_64")
        for i, name in enumerate(names):
            short = name.strip().removeprefix(_EMULATOR_PREFIX)
            if not _EMULATOR_RE.match(short):
                raise ValueError(f"item {i} is not an emulator name: {name!r} (expected "
                                 "x86_64 or qemu-system-x86_64)")
        return names

    @field_validator("artifact_cache_max", mode="before")
    @classmethod
    def _cache_max(cls, value: Any) -> str:
        try:
            parse_size(value)
        except InputError as exc:
            raise ValueError(exc.message + f" ({SIZE_HELP})") from None
        return str(value)

    @field_validator("address_wait", mode="before")
    @classmethod
    def _address_wait(cls, value: Any) -> str:
        try:
            parse_duration(value)
        except InputError as exc:
            raise ValueError(exc.message + f" ({DURATION_HELP})") from None
        return str(value)

    @property
    def artifact_cache_max_bytes(self) -> int:
        """``artifact_cache_max`` in bytes."""
        return parse_size(self.artifact_cache_max)

    @field_validator("state_dir", mode="before")
    @classmethod
    def _state_dir(cls, value: Any) -> Path:
        if not isinstance(value, str | Path) or not str(value).strip() or "\x00" in str(value):
            raise ValueError("expected an absolute directory path")
        path = Path(value)
        if not path.is_absolute():
            raise ValueError(f"not an absolute path: {str(value)!r}")
        if len(os.fsencode(path)) + _SOCKET_SUFFIX > _MAX_SOCKET_PATH:
            raise ValueError(f"{str(value)!r} is too long: no task's sockets under it would "
                             f"fit the {_MAX_SOCKET_PATH} bytes of a unix socket path")
        return path

    # Section: bounds on what one job may ask for (docs/policy.md, Bounds). Sizes are
    # strings like artifact_cache_max, checked here; the *_bytes properties read them.
    #: Most guest RAM a job may ask for (resources, ``-m``, memory backends);
    #: ``None``: the host's RAM.
    max_memory: str | None = None
    #: Most vCPUs a job may ask for (resources, ``-smp``).
    max_vcpus: int = Field(default=32, ge=1, le=1024, strict=True)
    #: Most port labels one task may declare (each one is a host port).
    max_ports: int = Field(default=64, ge=0, le=1024, strict=True)
    #: Largest serial console log of one VM before it is cut (rotated).
    max_log_size: str = "64MiB"
    #: URL schemes artifacts may be fetched with (local files are always confined to
    #: the job file's dir and ``image_paths``).
    artifact_getters: tuple[Literal["http", "https"], ...] = ("http", "https")
    #: Largest download, and most bytes unpacking or decompressing one artifact may write.
    artifact_max_size: str = "50GiB"
    artifact_max_unpacked: str = "100GiB"
    #: Most bytes written per byte of archive (a zip bomb is refused early).
    artifact_max_ratio: int = Field(default=1000, ge=1, strict=True)
    #: Most entries in one tar or zip archive.
    artifact_max_entries: int = Field(default=10000, ge=1, strict=True)

    @field_validator("max_memory", "max_log_size", "artifact_max_size", "artifact_max_unpacked",
                     mode="before")
    @classmethod
    def _bound_sizes(cls, value: Any) -> str | None:
        if value is None:
            return None
        try:
            if parse_size(value) <= 0:
                raise ValueError("must be more than 0 bytes")
        except InputError as exc:
            raise ValueError(exc.message + f" ({SIZE_HELP})") from None
        return str(value)

    @field_validator("artifact_getters", mode="before")
    @classmethod
    def _getters(cls, value: Any) -> tuple[str, ...]:
        return tuple(v.strip().lower() for v in _string_list(value, "URL schemes (http, https)"))

    def bytes_of(self, field: str) -> int | None:
        """A size field in bytes (``None`` when unset)."""
        value = getattr(self, field)
        return None if value is None else parse_size(value)


def host_config_from_mapping(data: object, where: str) -> HostConfig:
    """Validate a config body (from HCL or Nomad's SetConfig); errors name the field."""
    if not isinstance(data, dict):
        raise HostConfigError("expected a block of settings", where=where,
                              allowed=", ".join(HostConfig.model_fields))
    try:
        return HostConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            raise HostConfigError("unknown field", where=f"{where}: {field}",
                                  allowed=", ".join(HostConfig.model_fields)) from None
        msg = str(err["msg"]).removeprefix("Value error, ")
        msg = msg[:1].lower() + msg[1:]
        value = None if err["type"] == "value_error" else err.get("input")
        raise HostConfigError(msg, where=f"{where}: {field}", value=value) from None


def _unwrap(data: dict[str, Any], where: str) -> dict[str, Any]:
    """The settings body, whether bare, in ``config { }``, or in ``plugin "x" { config { } }``."""
    from vmdriver.hclfile import labelled, one_block

    if set(data) == {"plugin"}:
        plugins = labelled(data["plugin"], f"{where}: plugin")
        if len(plugins) != 1:
            raise HostConfigError("expected exactly one plugin block", where=where)
        label, body = plugins[0]
        if set(body) - {"config", "args"}:
            raise HostConfigError("unknown key in plugin block", where=f"{where}: plugin "
                                  f"{label!r}", allowed="config")
        data = {"config": body.get("config")} if "config" in body else {}
    if set(data) == {"config"}:
        data = one_block(data["config"], f"{where}: config")
    return data


def load_host_config(path: Path) -> HostConfig:
    """Read an operator file: the body of a Nomad ``plugin { config { } }`` block.

    The file may hold the fields at top level, wrapped in ``config { }``, or as
    a whole ``plugin "qemu" { config { } }`` block copied from a Nomad agent config.
    """
    from vmdriver.hclfile import load

    where = f"host config {path}"
    try:
        data = _unwrap(load(path), where)
    except HostConfigError:
        raise
    except InputError as exc:
        # A syntax error or unreadable file: same message, the operator's error class.
        raise HostConfigError(exc.message, where=f"host config {exc.where}", value=exc.value,
                              allowed=exc.allowed) from None
    return host_config_from_mapping(data, where)
