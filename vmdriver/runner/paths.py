"""Where a runner keeps things: the persistent data dir and the runtime dir.

Names and fallbacks are VM-Operator's, so a data dir (a PVC in Kubernetes) moves
between the two runners:

- data dir (persistent): ``uuid.txt``, ``fw-vars.fd`` (EFI variables), the template
  copy, ``cloud-init/``, the TPM state;
- runtime dir (deleted when the runner ends): ``monitor.sock`` (left for an operator's
  own QMP client), ``org.qemu.guest_agent.0``, ``org.jdrupes.vmop_agent.0``,
  ``swtpm.sock``, ``cloud-init.img``, ``status.json``, ``runner.pid``.

Unlike VM-Operator, the socket paths are derived from the runtime dir whether it was
configured or not (VM-Operator left them unset for an explicit ``runtimeDir``).
"""

from __future__ import annotations

import os
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vmdriver.errors import HostError, SpecError
from vmdriver.qemu.devices import TPM_SOCKET
from vmdriver.runner.config import RunnerConfig, Vm
from vmdriver.units import check_socket_path

APP = "vmrunner"
#: The longest file name placed in the runtime dir that must fit a unix socket path.
_LONGEST_SOCKET = "org.jdrupes.vmop_agent.0"


def default_data_dir(name: str, env: Mapping[str, str]) -> Path:
    """``$XDG_DATA_HOME/vmrunner/<name>``, else ``$HOME/.local/share/vmrunner/<name>``, else ``./<name>``."""
    if env.get("XDG_DATA_HOME"):
        return Path(env["XDG_DATA_HOME"]) / APP / name
    if env.get("HOME"):
        return Path(env["HOME"]) / ".local" / "share" / APP / name
    return Path(name)


def default_runtime_dir(name: str, env: Mapping[str, str]) -> Path:
    """``$XDG_RUNTIME_DIR/vmrunner/<name>``, else ``/tmp/$USER/vmrunner/<name>``, else
    ``/tmp/vmrunner/<name>``."""
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / APP / name
    if env.get("USER"):
        return Path("/tmp") / env["USER"] / APP / name
    return Path("/tmp") / APP / name


@dataclass(frozen=True)
class RunnerPaths:
    """The files of one runner, all absolute."""

    data_dir: Path
    runtime_dir: Path

    # Runtime dir: sockets and files that must not outlive the runner.
    @property
    def monitor_socket(self) -> Path:
        return self.runtime_dir / "monitor.sock"

    @property
    def guest_agent_socket(self) -> Path:
        return self.runtime_dir / "org.qemu.guest_agent.0"

    @property
    def vmop_agent_socket(self) -> Path:
        return self.runtime_dir / "org.jdrupes.vmop_agent.0"

    @property
    def swtpm_socket(self) -> Path:
        # Where the argv layer points QEMU's TPM chardev (VM-Operator: swtpm-sock).
        return self.runtime_dir / TPM_SOCKET

    @property
    def cloud_init_image(self) -> Path:
        return self.runtime_dir / "cloud-init.img"

    @property
    def status_file(self) -> Path:
        return self.runtime_dir / "status.json"

    @property
    def pid_file(self) -> Path:
        return self.runtime_dir / "runner.pid"

    # Data dir: what must survive a restart.
    @property
    def uuid_file(self) -> Path:
        return self.data_dir / "uuid.txt"

    @property
    def vars_file(self) -> Path:
        return self.data_dir / "fw-vars.fd"

    @property
    def tpm_state_dir(self) -> Path:
        return self.data_dir / "tpm"

    @property
    def template_copy(self) -> Path:
        return self.data_dir / "VM.j2"

    @property
    def cloud_init_dir(self) -> Path:
        return self.data_dir / "cloud-init"


def resolve_paths(config: RunnerConfig, env: Mapping[str, str] | None = None,
                  cwd: Path | None = None) -> RunnerPaths:
    """The config's dirs, or VM-Operator's fallbacks; relative paths are taken from ``cwd``."""
    env = os.environ if env is None else env
    base = cwd or Path.cwd()
    name = config.vm.name
    data = config.data_dir or default_data_dir(name, env)
    runtime = config.runtime_dir or default_runtime_dir(name, env)
    paths = RunnerPaths(data_dir=base / data, runtime_dir=base / runtime)
    check_socket_path(paths.runtime_dir / _LONGEST_SOCKET, where="runtimeDir")
    return paths


def prepare_dirs(paths: RunnerPaths) -> None:
    """Create both dirs (the runtime dir private: it holds the QMP socket)."""
    for path, mode in ((paths.data_dir, 0o750), (paths.runtime_dir, 0o700)):
        try:
            path.mkdir(mode=mode, parents=True, exist_ok=True)
        except OSError as exc:
            raise HostError(f"cannot create {path}: {exc.strerror}") from None
        if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
            raise HostError(f"{path} is not a writable directory")
    paths.runtime_dir.chmod(0o700)


def machine_uuid(vm: Vm, paths: RunnerPaths) -> str:
    """The VM's UUID: the configured one, else ``uuid.txt``, else a new one stored there.

    A stable UUID matters to guests (licences, Windows activation, cloud-init's
    instance), so a new one is written before it is used.
    """
    if vm.uuid is not None:
        return vm.uuid
    try:
        stored = paths.uuid_file.read_text(encoding="utf-8").split()
    except FileNotFoundError:
        stored = []
    except (OSError, UnicodeDecodeError) as exc:
        raise HostError(f"cannot read {paths.uuid_file}: {exc}") from None
    if stored:
        try:
            return str(uuidlib.UUID(stored[0]))
        except ValueError:
            raise SpecError("not a UUID", where=str(paths.uuid_file), value=stored[0]) from None
    new = str(uuidlib.uuid4())
    tmp = paths.uuid_file.with_suffix(".tmp")
    tmp.write_text(new + "\n", encoding="utf-8")
    tmp.replace(paths.uuid_file)
    return new
