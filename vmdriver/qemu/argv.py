"""Render a :class:`~vmdriver.spec.VMSpec` into a QEMU argv tuple.

The order and meaning follow Nomad's qemu driver, so jobs written for it get
the VM they expect::

    binary -machine type=T,accel=A -name N -m MB -drive file=F,if=I,id=image0
    -nographic <vmdriver control> <guest agent> <user args> <netdev> <-enable-kvm> <-smp>

Where vmdriver differs, it does so on purpose:

* every drive gets an explicit ``format=`` (a raw image is never probed);
* QEMU starts paused (``-S``) with a QMP monitor on an inherited socket and a
  second one on a unix socket in the task dir (for re-attaching), not HMP;
* ``-smp`` follows ``resources.cores`` under every accelerator, unless the
  user's args already hold a ``-smp``;
* hostfwd rules come sorted by label, so the argv is deterministic;
* values are comma-escaped (QEMU reads ``,`` as an option separator).

The result is a tuple; it is joined into one string only for display.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmdriver.spec import VMSpec

#: QMP over the inherited socketpair (the launching supervisor's channel).
QMP_FD_ID = "vmdriver-qmp"
#: QMP over the unix socket in the task dir (for re-attaching).
QMP_PATH_ID = "vmdriver-qmp-sock"
#: Seccomp filter flags: block what a compromised QEMU would need to escape.
SANDBOX_ARG = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
#: Machine types that have an ISA bus for the pvpanic device.
_PVPANIC_MACHINES = ("pc", "q35")


def qemu_escape(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax."""
    return value.replace(",", ",,")


@dataclass(frozen=True)
class RenderContext:
    """Host facts the argv depends on, decided before rendering."""

    #: Absolute path of the emulator binary.
    binary: Path
    #: Accelerator after resolving ``auto`` (``kvm`` or ``tcg``).
    accelerator: str
    #: Path of the re-attach QMP socket.
    qmp_socket: Path
    #: Path of the guest agent socket.
    qga_socket: Path
    #: Drive paths as QEMU opens them, one per spec drive.
    drive_paths: tuple[str, ...]
    #: Detected image format per drive.
    drive_formats: tuple[str, ...]
    #: Inherited QMP socket fd in QEMU; ``None`` renders no fd monitor.
    qmp_fd: int | None = 3
    #: Add ``-sandbox`` (only where the binary supports it).
    sandbox: bool = False
    #: Add ``-no-user-config`` so host-wide QEMU config files do not leak in.
    no_user_config: bool = True
    #: Per drive, open fds of its image (read-only first, then read-write) that QEMU
    #: inherits; a drive with fds is rendered as ``-add-fd`` + ``file=/dev/fdset/N``
    #: so QEMU uses the very file policy checked. Empty: drives are opened by path.
    drive_fds: tuple[tuple[int, ...], ...] = ()

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """Every image fd QEMU must inherit."""
        return tuple(fd for fds in self.drive_fds for fd in fds)


def _has_option(args: tuple[str, ...], name: str) -> bool:
    """True if ``args`` holds ``-name`` in any spelling QEMU accepts."""
    for arg in args:
        flag = arg.strip().split("=", 1)[0]
        if flag.startswith("--"):
            flag = flag[1:]
        if flag == name:
            return True
    return False


def _machine_base(spec: VMSpec) -> str:
    return spec.machine_type.split(",", 1)[0]


def render_argv(spec: VMSpec, ctx: RenderContext) -> tuple[str, ...]:
    """The full argv for ``spec`` on this host, as a tuple."""
    argv: list[str] = [str(ctx.binary)]
    argv += ["-machine", f"type={spec.machine_type},accel={ctx.accelerator}"]
    argv += ["-name", qemu_escape(spec.display_name or spec.name)]
    argv += ["-m", f"{spec.resources.memory_mib}M"]
    for i, (drive, given, fmt) in enumerate(
        zip(spec.drives, ctx.drive_paths, ctx.drive_formats, strict=True)
    ):
        fds = ctx.drive_fds[i] if i < len(ctx.drive_fds) else ()
        for fd in fds:
            argv += ["-add-fd", f"fd={fd},set={i + 1},opaque={drive.id}"]
        path = f"/dev/fdset/{i + 1}" if fds else given
        opts = [f"file={qemu_escape(path)}", f"if={drive.interface.value}", f"id={drive.id}"]
        opts.append(f"format={fmt}")
        if drive.media == "cdrom":
            opts.append("media=cdrom")
        if drive.read_only:
            opts.append("readonly=on")
        argv += ["-drive", ",".join(opts)]
    argv.append("-nographic")
    argv += _control_args(spec, ctx)
    if spec.guest_agent:
        argv += [
            "-chardev",
            f"socket,path={qemu_escape(str(ctx.qga_socket))},server=on,wait=off,id=qga0",
            "-device", "virtio-serial",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]
    argv += spec.args
    argv += _network_args(spec)
    if ctx.accelerator == "kvm":
        argv.append("-enable-kvm")
    if spec.resources.cores and not _has_option(spec.args, "-smp"):
        argv += ["-smp", str(spec.resources.cores)]
    return tuple(argv)


def _control_args(spec: VMSpec, ctx: RenderContext) -> list[str]:
    """vmdriver's own plumbing: paused start, QMP monitors, panic device, hardening."""
    out = ["-S"]
    if ctx.no_user_config:
        out.append("-no-user-config")
    if ctx.sandbox:
        out += ["-sandbox", SANDBOX_ARG]
    if ctx.qmp_fd is not None:
        out += ["-chardev", f"socket,id={QMP_FD_ID},fd={ctx.qmp_fd}"]
        out += ["-mon", f"chardev={QMP_FD_ID},mode=control"]
    sock = qemu_escape(str(ctx.qmp_socket))
    out += ["-chardev", f"socket,id={QMP_PATH_ID},path={sock},server=on,wait=off"]
    out += ["-mon", f"chardev={QMP_PATH_ID},mode=control"]
    if spec.emulator in ("x86_64", "i386") and _machine_base(spec) in _PVPANIC_MACHINES:
        out += ["-device", "pvpanic"]
    return out


def _network_args(spec: VMSpec) -> list[str]:
    net = spec.network
    if net is None or not (net.forwards or net.dns_servers or net.dns_searches):
        return []
    opts = ["user", "id=user.0"]
    if net.dns_servers:
        opts.append(f"dns={qemu_escape(net.dns_servers[0])}")
    opts += [f"dnssearch={qemu_escape(s)}" for s in net.dns_searches]
    for fwd in sorted(net.forwards, key=lambda f: f.label):
        opts += [f"hostfwd={proto}:{fwd.host_ip}:{fwd.host_port}-:{fwd.guest_port}"
                 for proto in fwd.protocols]
    return ["-netdev", ",".join(opts), "-device", f"{net.model},netdev=user.0"]


def display(argv: tuple[str, ...]) -> str:
    """A shell-quoted one-line form, for logs and `vmdriver argv` only."""
    import shlex

    return shlex.join(argv)
