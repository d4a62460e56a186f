"""Render a :class:`~vmdriver.spec.VMSpec` into a QEMU argv tuple.

The order follows Nomad's qemu driver, so jobs written for it get the VM they
expect::

    binary -machine type=T,accel=A -name N -m MB <drives> -nographic <vmdriver control>
    <guest agent> <channels, TPM, shares, balloon> <user args> <NICs> <-enable-kvm> <-smp>

Where vmdriver differs, it does so on purpose:

* drives are ``-blockdev`` node graphs + ``-device`` (:mod:`vmdriver.qemu.blockdev`),
  each with an explicit format (a raw image is never probed), addressable by QMP;
* QEMU starts paused (``-S``) with a QMP monitor on an inherited socket and a
  second one on a unix socket in the VM's runtime dir (for re-attaching), not HMP;
* ``-smp`` follows the vCPU count under every accelerator, unless the user's
  args already hold a ``-smp``;
* hostfwd rules come sorted by label, so the argv is deterministic;
* values are comma-escaped (QEMU reads ``,`` as an option separator).

The result is a tuple; it is joined into one string only for display.
"""

from __future__ import annotations

import shlex

from vmdriver.qemu import devices as dev
from vmdriver.qemu.blockdev import qemu_escape, render_drives
from vmdriver.qemu.cmdline import has_option
from vmdriver.qemu.context import DriveSource, NicFds, RbdSource, RenderContext
from vmdriver.spec import VMSpec

__all__ = ["SANDBOX_ARG", "DriveSource", "NicFds", "RbdSource", "RenderContext", "display",
           "qemu_escape", "render_argv"]

#: QMP over the inherited socketpair (the launching supervisor's channel).
QMP_FD_ID = "vmdriver-qmp"
#: QMP over the unix socket in the runtime dir (for re-attaching).
QMP_PATH_ID = "vmdriver-qmp-sock"
#: Seccomp filter flags: block what a compromised QEMU would need to escape.
SANDBOX_ARG = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
#: Machine types that have an ISA bus for the pvpanic device.
_PVPANIC_MACHINES = ("pc", "q35")


def render_argv(spec: VMSpec, ctx: RenderContext) -> tuple[str, ...]:
    """The full argv for ``spec`` on this host, as a tuple."""
    fw_props, fw_args = dev.firmware_args(spec)
    machine = [f"type={spec.machine_type}", f"accel={ctx.accelerator}", *fw_props]
    memory = _memory(spec)
    if dev.needs_shared_memory(spec):
        machine.append("memory-backend=mem0")
    argv: list[str] = [str(ctx.binary), "-machine", ",".join(machine)]
    # guest= so a name holding `=` (an image's file name) cannot add -name keys.
    argv += ["-name", f"guest={qemu_escape(spec.display_name or spec.name)}"]
    if spec.uuid:
        argv += ["-uuid", spec.uuid]
    argv += ["-m", memory]
    if dev.needs_shared_memory(spec):
        argv += ["-object", f"memory-backend-memfd,id=mem0,size={memory},share=on"]
    argv += fw_args
    argv += render_drives(spec, ctx)
    if spec.cpu.model:
        argv += ["-cpu", spec.cpu.model]
    argv += _display(spec, ctx)
    if spec.boot_menu:
        argv += ["-boot", "menu=on"]
    argv += _control_args(spec, ctx)
    argv += dev.guest_agent_args(spec, ctx)
    argv += dev.channel_args(spec, ctx)
    argv += dev.tpm_args(spec, ctx)
    argv += dev.share_args(spec, ctx)
    argv += dev.misc_devices(spec)
    if spec.vmgenid:
        argv += ["-device", f"vmgenid,guid={spec.vmgenid},id=vmgenid0"]
    argv += spec.args
    argv += dev.render_nics(spec, ctx)
    if ctx.accelerator == "kvm":
        argv.append("-enable-kvm")
    if not has_option(spec.args, "smp"):
        argv += _smp(spec)
    return tuple(argv)


def _memory(spec: VMSpec) -> str:
    # With a ceiling, the guest gets the ceiling and the balloon gives back the rest
    # (VM-Operator's way: no memory hotplug needed to grow).
    res = spec.resources
    return f"{res.max_memory_mib or res.memory_mib}M"


def _display(spec: VMSpec, ctx: RenderContext) -> list[str]:
    shown = spec.display
    if shown.kind == "spice" and ctx.spice and shown.spice_port:
        addr = qemu_escape(shown.spice_address)
        return ["-display", "none", "-serial", "stdio", "-device", "qxl-vga",
                "-spice", f"port={shown.spice_port},addr={addr},disable-ticketing=on"]
    return ["-nographic"]


def _smp(spec: VMSpec) -> list[str]:
    vcpus, cpu = spec.resources.cores, spec.cpu
    extra = {"maxcpus": cpu.max_vcpus, "sockets": cpu.sockets, "dies": cpu.dies,
             "cores": cpu.cores, "threads": cpu.threads}
    given = {k: v for k, v in extra.items() if v is not None}
    if not given:
        return ["-smp", str(vcpus)] if vcpus else []
    parts = ([f"cpus={vcpus}"] if vcpus else []) + [f"{k}={v}" for k, v in given.items()]
    return ["-smp", ",".join(parts)]


def _control_args(spec: VMSpec, ctx: RenderContext) -> list[str]:
    """vmdriver's own plumbing: paused start, QMP monitors, panic device, hardening."""
    out = ["-S"]
    if ctx.no_user_config:
        out.append("-no-user-config")
    if ctx.sandbox:
        out += ["-sandbox", SANDBOX_ARG]
    if spec.incoming:
        # The state comes later, through an fd passed over QMP (migrate-incoming).
        out += ["-incoming", "defer"]
    if ctx.qmp_fd is not None:
        out += ["-chardev", f"socket,id={QMP_FD_ID},fd={ctx.qmp_fd}"]
        out += ["-mon", f"chardev={QMP_FD_ID},mode=control"]
    sock = qemu_escape(str(ctx.qmp_socket))
    out += ["-chardev", f"socket,id={QMP_PATH_ID},path={sock},server=on,wait=off"]
    out += ["-mon", f"chardev={QMP_PATH_ID},mode=control"]
    if spec.emulator in ("x86_64", "i386") and spec.machine_type in _PVPANIC_MACHINES:
        out += ["-device", "pvpanic"]
    return out


def display(argv: tuple[str, ...]) -> str:
    """A shell-quoted one-line form, for logs and `vmdriver argv` only."""
    return shlex.join(argv)
