"""The canonical VM spec: the one model every face (job file, Nomad plugin, runner) maps into.

A :class:`VMSpec` says *what* VM to run; it holds no host state (pids, sockets,
allocated resources beyond the ports a face already chose). The argv renderer
(:mod:`vmdriver.qemu.argv`) turns a spec plus a task directory into a QEMU
command line; the supervisor runs it.

Lists are tuples and models are frozen so a spec can be hashed, compared and
stored as JSON in a task handle for re-attaching.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Frozen(BaseModel):
    """Base of every spec model: immutable and strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Accelerator(enum.StrEnum):
    """How guest code runs. ``auto`` picks KVM only where the KVM probe passed."""

    KVM = "kvm"
    TCG = "tcg"
    AUTO = "auto"


class DriveInterface(enum.StrEnum):
    """QEMU's ``-drive if=`` values Nomad's qemu driver accepts."""

    IDE = "ide"
    SCSI = "scsi"
    SD = "sd"
    MTD = "mtd"
    FLOPPY = "floppy"
    PFLASH = "pflash"
    VIRTIO = "virtio"
    NONE = "none"


class Drive(Frozen):
    """One block device given to the guest."""

    #: Image path as the job gave it, resolved against the task dir by the runtime.
    path: str
    #: Bus the drive sits on.
    interface: DriveInterface = DriveInterface.IDE
    #: Image format; ``None`` means "detect with qemu-img before launch", so a raw
    #: image is never probed by QEMU itself.
    format: str | None = None
    #: ``disk`` or ``cdrom``.
    media: Literal["disk", "cdrom"] = "disk"
    read_only: bool = False
    #: QEMU drive id; the first image is ``image0`` as in Nomad.
    id: str = "image0"


class PortForward(Frozen):
    """A host port forwarded to a guest port over user-mode networking."""

    label: str
    host_port: int = Field(ge=1, le=65535)
    guest_port: int = Field(ge=1, le=65535)
    #: Host address to bind; empty binds every address (Nomad's behaviour).
    host_ip: str = ""
    protocols: tuple[Literal["tcp", "udp"], ...] = ("udp", "tcp")


class NetworkSpec(Frozen):
    """A NIC. Only user-mode networking exists today; bridges come with the virt face."""

    mode: Literal["user"] = "user"
    model: str = "virtio-net"
    forwards: tuple[PortForward, ...] = ()
    dns_servers: tuple[str, ...] = ()
    dns_searches: tuple[str, ...] = ()


class Resources(Frozen):
    """What the VM may use of the host."""

    #: Guest RAM in MiB (``-m``).
    memory_mib: int = Field(default=300, ge=1)
    #: Hard memory limit for the QEMU process in MiB, if the task set one.
    memory_max_mib: int | None = None
    #: vCPUs; ``None`` leaves QEMU's default (one) unless args set ``-smp``.
    cores: int | None = Field(default=None, ge=1)
    #: Nomad CPU shares in MHz; only weights the cgroup.
    cpu_shares: int | None = None
    #: Host CPUs QEMU may run on (``cpuset.cpus``), if reserved.
    cpuset: tuple[int, ...] = ()


class ShutdownPolicy(Frozen):
    """How a stop request is carried out."""

    #: Press the ACPI power button and wait for the guest before signalling.
    graceful: bool = False
    #: Seconds to wait for the guest (graceful) or for QEMU after the signal.
    timeout_s: float = Field(default=5.0, ge=0)
    #: Signal sent to QEMU when the guest did not power off in time.
    signal: str = "SIGINT"


class VMSpec(Frozen):
    """Everything needed to run one VM."""

    #: Task name; also the VM's ``-name`` unless ``display_name`` is set.
    name: str
    #: QEMU's ``-name`` value (Nomad uses the image's base name).
    display_name: str = ""
    #: Architecture suffix of ``qemu-system-<emulator>``.
    emulator: str = "x86_64"
    machine_type: str = "pc"
    accelerator: Accelerator = Accelerator.TCG
    drives: tuple[Drive, ...] = ()
    network: NetworkSpec | None = None
    resources: Resources = Resources()
    shutdown: ShutdownPolicy = ShutdownPolicy()
    guest_agent: bool = False
    #: Extra QEMU arguments, verbatim, appended after vmdriver's own.
    args: tuple[str, ...] = ()
    #: Environment for the QEMU process (Nomad's task env).
    env: tuple[tuple[str, str], ...] = ()
    #: Serial-console line that means "the guest is up" (for `run --wait-ready` and tests).
    ready_line: str = ""

    def image_drive(self) -> Drive | None:
        """The first drive, the one Nomad's ``image_path`` maps to."""
        return self.drives[0] if self.drives else None


def resolve_in(base: Path, path: str) -> Path:
    """``path`` as QEMU will see it: relative paths are relative to ``base``."""
    p = Path(path)
    return p if p.is_absolute() else base / p
