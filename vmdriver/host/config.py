"""The operator's host configuration: the body of the Nomad plugin's ``config {}`` block.

The same fields reach vmdriver three ways: ``vmdriver run --host-config FILE``
(an HCL file holding that body), the Nomad plugin's SetConfig (msgpack), and
defaults when neither is given.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

#: Where `vmdriver run` looks for a host config when none is given.
DEFAULT_HOST_CONFIG = Path("/etc/vmdriver/host.hcl")


def default_state_dir() -> Path:
    """Root-owned runs keep state in /var/lib; others under XDG_STATE_HOME."""
    if os.geteuid() == 0:
        return Path("/var/lib/vmdriver")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "vmdriver"


class HostConfig(BaseModel):
    """Operator settings. Empty allowlists allow everything, as in Nomad's qemu driver."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Host directories images may be loaded from, besides the task and alloc dirs.
    image_paths: tuple[str, ...] = ()
    #: QEMU flags a job's ``args`` may use; empty allows every flag.
    args_allowlist: tuple[str, ...] = ()
    #: Emulators (``x86_64`` or ``qemu-system-x86_64``) jobs may use; empty allows all.
    emulators_allowlist: tuple[str, ...] = ()
    #: Where task directories, sockets and logs of `vmdriver run` live.
    state_dir: Path = Field(default_factory=default_state_dir)
    #: Apply QEMU's seccomp sandbox (``-sandbox on``) where QEMU supports it.
    sandbox: bool = True


def host_config_from_mapping(data: dict[str, object], where: str) -> HostConfig:
    """Validate a config body (from HCL or Nomad's SetConfig); errors name the field."""
    from pydantic import ValidationError

    from vmdriver.errors import HostConfigError

    try:
        return HostConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise HostConfigError("unknown field", where=f"{where}: {field}",
                                  allowed=", ".join(HostConfig.model_fields)) from None
        raise HostConfigError(err["msg"].lower(), where=f"{where}: {field}",
                              value=err.get("input")) from None


def load_host_config(path: Path) -> HostConfig:
    """Read an operator file: the body of a Nomad ``plugin { config { } }`` block.

    The file may hold the fields at top level, or wrapped in ``config { }``.
    """
    from vmdriver.hclfile import load, one_block

    data = load(path)
    if set(data) == {"config"}:
        data = one_block(data["config"], f"{path}: config")
    return host_config_from_mapping(data, str(path))
