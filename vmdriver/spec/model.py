"""The canonical VM spec: the one model every face (job file, Nomad plugin, runner) maps into.

A :class:`VMSpec` says *what* VM to run; it holds no host state (pids, sockets,
fds, allocated resources beyond the ports a face already chose). The runtime
prepares it for this host (policy, images opened as fds, helper processes) and
the argv layer (:mod:`vmdriver.qemu.argv`) renders it.

Lists are tuples and models are frozen so a spec can be hashed, compared and
stored as JSON in a task handle for re-attaching.
"""

from __future__ import annotations

import enum
import signal as _signal
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from vmdriver.spec import defaults
from vmdriver.spec.devices import (
    Channel,
    Drive,
    Frozen,
    Nic,
    NoNic,
    Share,
)


class Accelerator(enum.StrEnum):
    """How guest code runs. ``auto`` picks KVM only where the KVM probe passed."""

    KVM = "kvm"
    TCG = "tcg"
    AUTO = "auto"


class StopSignal(enum.StrEnum):
    """Signals a stop may send to QEMU (Nomad's ``kill_signal``)."""

    SIGINT = "SIGINT"
    SIGTERM = "SIGTERM"
    SIGQUIT = "SIGQUIT"
    SIGHUP = "SIGHUP"
    SIGKILL = "SIGKILL"
    SIGUSR1 = "SIGUSR1"
    SIGUSR2 = "SIGUSR2"

    @classmethod
    def parse(cls, name: str) -> StopSignal:
        """``int``, ``INT``, ``sigint`` and ``SIGINT`` all name SIGINT; ValueError otherwise."""
        upper = name.strip().upper()
        return cls(upper if upper.startswith("SIG") else f"SIG{upper}")

    @property
    def number(self) -> int:
        """The signal's number on this host."""
        return int(getattr(_signal, self.value))


class Resources(Frozen):
    """What the VM gets, and what it may take of the host."""

    #: Guest RAM at boot, in MiB (``-m``).
    memory_mib: int = Field(default=defaults.MEMORY_MIB, ge=1)
    #: Hot-pluggable/balloon ceiling of guest RAM in MiB (``-m maxmem=``); ``None``: fixed.
    max_memory_mib: int | None = Field(default=None, ge=1)
    #: Hard memory limit of the QEMU process in MiB, if the task set one (Nomad memory_max).
    memory_max_mib: int | None = None
    #: vCPUs at boot; ``None`` leaves QEMU's default (one) unless args set ``-smp``.
    cores: int | None = Field(default=None, ge=1)
    #: Nomad CPU shares in MHz; only weights the cgroup.
    cpu_shares: int | None = None
    #: Host CPUs QEMU may run on (``cpuset.cpus``), where cores were reserved.
    cpuset: tuple[int, ...] = ()


class Cpu(Frozen):
    """The guest's CPUs beyond their count."""

    #: ``-cpu`` model (``host``, ``max``, ``qemu64``...); empty: QEMU's default.
    model: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]{0,64}$")
    #: vCPUs the guest can grow to by hotplug; ``None``: no hotplug.
    max_vcpus: int | None = Field(default=None, ge=1, le=1024)
    sockets: int | None = Field(default=None, ge=1)
    dies: int | None = Field(default=None, ge=1)
    cores: int | None = Field(default=None, ge=1)
    threads: int | None = Field(default=None, ge=1)


class Firmware(Frozen):
    """What boots the machine.

    For UEFI, ``code`` and ``vars_template`` are host firmware files (found by the
    host layer); ``vars`` is the VM's own copy, kept in its data dir so EFI
    variables persist across restarts.
    """

    kind: Literal["bios", "uefi", "uefi-secure"] = "bios"
    code: str | None = None
    vars_template: str | None = None
    vars: str | None = None

    @model_validator(mode="after")
    def _files(self) -> Firmware:
        if self.kind != "bios" and not self.code:
            raise ValueError(f"{self.kind} firmware needs its code file")
        return self


class Tpm(Frozen):
    """A TPM backed by swtpm, a helper process the VM owns; state in the data dir."""

    model: Literal["tpm-tis", "tpm-crb"] = "tpm-tis"
    version: Literal["2.0", "1.2"] = "2.0"


class Rtc(Frozen):
    """The guest's real-time clock (``-rtc``)."""

    #: ``utc``, ``localtime`` or a start time like ``2006-06-17T16:01:21``.
    base: str = Field(default="utc", pattern=r"^(utc|localtime|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)$")
    clock: Literal["host", "rt", "vm"] = "host"


class Display(Frozen):
    """How a human sees the VM: the serial console only, or SPICE too."""

    kind: Literal["serial", "spice"] = "serial"
    spice_port: int | None = Field(default=None, ge=1, le=65535)
    spice_address: str = "127.0.0.1"


class Seed(Frozen):
    """A small config disk the runtime builds and attaches as a CD-ROM (cloud-init's NoCloud).

    Files are text, written as given; the face renders them (YAML, MIME) and
    never puts a secret in them that may not land in the VM record (a password
    only as its crypt hash).
    """

    #: Volume label the guest looks for (``cidata`` for NoCloud).
    label: str = Field(default="cidata", pattern=r"^[A-Za-z0-9_-]{1,11}$")
    #: ``(name, content)`` pairs: ``meta-data``, ``user-data``, ``network-config``.
    files: tuple[tuple[str, str], ...]
    format: Literal["iso", "fat"] = "iso"

    @field_validator("files")
    @classmethod
    def _names(cls, value: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        for name, _ in value:
            if not name or "/" in name or name.startswith(".") or len(name) > 64:
                raise ValueError(f"not a plain file name: {name!r}")
        _no_duplicates("seed file", [name for name, _ in value])
        return value


class ShutdownPolicy(Frozen):
    """How a stop request is carried out."""

    #: Ask the guest first (ACPI power button, or the guest agent) before signalling.
    graceful: bool = False
    #: With ``graceful``: ask through the guest agent's ``guest-shutdown`` when it
    #: answers, the power button otherwise.
    via_agent: bool = False
    #: Seconds to wait for the guest (graceful) or for QEMU after the signal.
    timeout_s: float = Field(default=defaults.KILL_TIMEOUT_S, ge=0)
    #: Signal sent to QEMU when the guest did not power off in time.
    signal: StopSignal = StopSignal(defaults.KILL_SIGNAL)
    #: Seconds the POWERDOWN event may take to confirm the ACPI power button press;
    #: unconfirmed, the stop goes on to the signal (VM-Operator's runner waits 5 s).
    powerdown_confirm_s: float = Field(default=defaults.POWERDOWN_CONFIRM_S, gt=0)

    @field_validator("signal", mode="before")
    @classmethod
    def _signal(cls, value: object) -> object:
        return StopSignal.parse(value) if isinstance(value, str) else value


class VMSpec(Frozen):
    """Everything needed to run one VM."""

    #: Task name; also the VM's ``-name`` unless ``display_name`` is set.
    name: str
    #: QEMU's ``-name`` value (Nomad uses the image's base name).
    display_name: str = ""
    #: SMBIOS UUID of the machine; ``None``: QEMU's default.
    uuid: str | None = Field(default=None, pattern=r"^[0-9a-fA-F-]{36}$")
    #: Architecture suffix of ``qemu-system-<emulator>``.
    emulator: str = defaults.EMULATOR
    machine_type: str = Field(default=defaults.MACHINE, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    accelerator: Accelerator = Accelerator.TCG
    firmware: Firmware = Firmware()
    boot_menu: bool = False
    cpu: Cpu = Cpu()
    resources: Resources = Resources()
    #: A virtio balloon, for changing guest RAM at run time and the guest's memory stats.
    balloon: bool = False
    drives: tuple[Drive, ...] = ()
    #: Empty: QEMU's default NIC (what Nomad's qemu driver gives). ``(NoNic(),)``: none.
    nics: tuple[Nic, ...] = ()
    tpm: Tpm | None = None
    rtc: Rtc | None = None
    display: Display = Display()
    channels: tuple[Channel, ...] = ()
    shares: tuple[Share, ...] = ()
    #: A config disk (cloud-init) built at start in the runtime dir, attached as a CD-ROM.
    seed: Seed | None = None
    guest_agent: bool = False
    shutdown: ShutdownPolicy = ShutdownPolicy()
    #: Extra QEMU arguments, verbatim, appended after vmdriver's own (checked by policy).
    args: tuple[str, ...] = ()
    #: A ``vmgenid`` device with this generation id (``auto``: QEMU makes a fresh one each
    #: start). A guest kernel reseeds its RNG when the id changes: what a clone of a memory
    #: snapshot needs (see docs/snapshots.md).
    vmgenid: str | None = Field(default=None, pattern=r"^(auto|[0-9a-fA-F-]{36})$")
    #: Start from this memory snapshot of the snapshot store (its disks, RAM and devices).
    snapshot: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    #: A graceful stop saves the VM's state; the next start of the same task resumes it.
    suspend: bool = False
    #: Where a suspend saves to (decided by the runtime from ``suspend``; a host path).
    suspend_to: str | None = None
    #: Start with ``-incoming defer``: the runtime loads the state over QMP before ``cont``.
    incoming: bool = False

    @model_validator(mode="after")
    def _unique(self) -> VMSpec:
        _no_duplicates("drive id", [d.id for d in self.drives])
        named = [n for n in self.nics if not isinstance(n, NoNic)]
        if len(named) != len(self.nics) and len(self.nics) > 1:
            raise ValueError("a 'none' NIC must be the only NIC")
        _no_duplicates("NIC id", [n.id for n in named])
        _no_duplicates("channel id", [c.id for c in self.channels])
        _no_duplicates("share tag", [s.tag for s in self.shares])
        if self.firmware.kind == "uefi-secure" and not self.machine_type.startswith(("q35", "pc-q35")):
            raise ValueError("secure boot needs a q35 machine (SMM)")
        return self


def _no_duplicates(what: str, values: list[str]) -> None:
    twice = sorted(v for v, n in Counter(values).items() if n > 1)
    if twice:
        raise ValueError(f"{what} used more than once: {', '.join(twice)}")


def resolve_in(base: Path, path: str) -> Path:
    """``path`` as QEMU will see it: relative paths are relative to ``base``."""
    p = Path(path)
    return p if p.is_absolute() else base / p
