"""NICs, firmware, TPM, channels, shares and the small devices, as QEMU arguments.

NICs render as ``-netdev <kind>,id=<id>`` + ``-device <model>,netdev=<id>,id=<id>``:
the netdev and the device share the NIC's id (they live in different
namespaces), so QMP can address either. Taps and macvtaps arrive as inherited
fds, so QEMU needs no network privileges.
"""

from __future__ import annotations

import json

from vmdriver.errors import SpecError
from vmdriver.qemu.blockdev import qemu_escape
from vmdriver.qemu.context import RenderContext
from vmdriver.spec import MacvtapNic, NoNic, TapNic, UserNic, VMSpec
from vmdriver.spec.devices import Nic

#: The guest agent's virtio-serial port name (what qemu-ga looks for).
QGA_PORT = "org.qemu.guest_agent.0"
#: Chardev of the guest agent.
QGA_CHARDEV = "qga0"
#: Device id of the agent's port: QEMU reports the guest opening a port (VSERPORT_CHANGE)
#: only for a port with an id.
QGA_DEVICE = "qga0-port"
#: Socket of the TPM emulator (swtpm) in the runtime dir.
TPM_SOCKET = "swtpm.sock"


def virtiofs_socket(tag: str) -> str:
    """Socket name of the virtiofsd serving ``tag``, in the runtime dir."""
    return f"vfs-{tag}.sock"


def channel_socket(channel_id: str) -> str:
    """Socket name of an extra channel, in the runtime dir."""
    return f"{channel_id}.sock"


def render_nics(spec: VMSpec, ctx: RenderContext) -> list[str]:
    """``-netdev``/``-device`` pairs (or ``-nic none``) of every NIC."""
    out: list[str] = []
    for nic in spec.nics:
        if isinstance(nic, NoNic):
            return ["-nic", "none"]
        out += ["-netdev", _netdev(nic, ctx)]
        dev = [nic.model, f"netdev={nic.id}", f"id={nic.id}"]
        if nic.mac:
            dev.append(f"mac={nic.mac}")
        out += ["-device", ",".join(dev)]
    return out


def _netdev(nic: Nic, ctx: RenderContext) -> str:
    if isinstance(nic, UserNic):
        opts = ["user", f"id={nic.id}"]
        if nic.dns_servers:
            opts.append(f"dns={qemu_escape(nic.dns_servers[0])}")
        opts += [f"dnssearch={qemu_escape(s)}" for s in nic.dns_searches]
        for fwd in sorted(nic.forwards, key=lambda f: f.label):
            opts += [f"hostfwd={proto}:{fwd.host_ip}:{fwd.host_port}-:{fwd.guest_port}"
                     for proto in fwd.protocols]
        return ",".join(opts)
    assert isinstance(nic, TapNic | MacvtapNic)
    fds = ctx.nic_fds.get(nic.id)
    if fds is None:
        raise SpecError("NIC has no prepared tap fd", where=f"nic {nic.id}")
    opts = ["tap", f"id={nic.id}", f"fd={fds.tap}"]
    if fds.vhost is not None:
        opts += ["vhost=on", f"vhostfd={fds.vhost}"]
    return ",".join(opts)


def firmware_args(spec: VMSpec) -> tuple[list[str], list[str]]:
    """(``-machine`` properties, other args) for UEFI firmware; nothing for BIOS."""
    fw = spec.firmware
    if fw.kind == "bios":
        return [], []
    assert fw.code is not None
    args = _pflash_nodes("fw-code", fw.code, read_only=True)
    props = ["pflash0=fw-code"]
    if fw.vars:
        args += _pflash_nodes("fw-vars", fw.vars, read_only=False)
        props.append("pflash1=fw-vars")
    if fw.kind == "uefi-secure":
        props.append("smm=on")
        args += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return props, args


def _pflash_nodes(node: str, path: str, *, read_only: bool) -> list[str]:
    proto = {"driver": "file", "filename": path, "node-name": f"{node}-file", "read-only": read_only}
    top = {"driver": "raw", "file": f"{node}-file", "node-name": node, "read-only": read_only}
    return ["-blockdev", json.dumps(proto, separators=(",", ":")),
            "-blockdev", json.dumps(top, separators=(",", ":"))]


def tpm_args(spec: VMSpec, ctx: RenderContext) -> list[str]:
    """The TPM front end, talking to the VM's swtpm over its socket."""
    if spec.tpm is None:
        return []
    sock = qemu_escape(str(ctx.socket(TPM_SOCKET)))
    return ["-chardev", f"socket,id=tpm0-chr,path={sock}",
            "-tpmdev", "emulator,id=tpm0,chardev=tpm0-chr",
            "-device", f"{spec.tpm.model},tpmdev=tpm0,id=tpm0-dev"]


def channel_args(spec: VMSpec, ctx: RenderContext) -> list[str]:
    """Extra serial and virtio-serial ports, each on a socket in the runtime dir."""
    out: list[str] = []
    for ch in spec.channels:
        sock = qemu_escape(str(ctx.socket(channel_socket(ch.id))))
        out += ["-chardev", f"socket,id={ch.id},path={sock},server=on,wait=off"]
        if ch.kind == "serial":
            out += ["-serial", f"chardev:{ch.id}"]
        else:
            out += ["-device", f"virtserialport,bus=vser0.0,chardev={ch.id},name={ch.name or ch.id}"]
    if any(ch.kind == "virtio-serial" for ch in spec.channels):
        out = ["-device", "virtio-serial-pci,id=vser0", *out]
    return out


def guest_agent_args(spec: VMSpec, ctx: RenderContext) -> list[str]:
    """The guest agent's virtio-serial port on the agent socket."""
    if not spec.guest_agent:
        return []
    return [
        "-chardev",
        f"socket,path={qemu_escape(str(ctx.qga_socket))},server=on,wait=off,id={QGA_CHARDEV}",
        "-device", "virtio-serial",
        "-device", f"virtserialport,chardev={QGA_CHARDEV},name={QGA_PORT},id={QGA_DEVICE}",
    ]


def share_args(spec: VMSpec, ctx: RenderContext) -> list[str]:
    """virtio-9p exports, or vhost-user-fs devices talking to the VM's virtiofsd."""
    out: list[str] = []
    for share in spec.shares:
        if share.transport == "9p":
            path = qemu_escape(ctx.share_paths[share.tag])
            ro = ",readonly=on" if share.read_only else ""
            out += ["-fsdev", f"local,id={share.tag}-fs,path={path},security_model=none{ro}",
                    "-device", f"virtio-9p-pci,fsdev={share.tag}-fs,mount_tag={share.tag}"]
        else:
            sock = qemu_escape(str(ctx.socket(virtiofs_socket(share.tag))))
            out += ["-chardev", f"socket,id={share.tag}-vfs,path={sock}",
                    "-device", f"vhost-user-fs-pci,chardev={share.tag}-vfs,tag={share.tag}"]
    return out


def needs_shared_memory(spec: VMSpec) -> bool:
    """vhost-user devices (virtiofs) need guest RAM in a shareable memory backend."""
    return any(s.transport == "virtiofs" for s in spec.shares)


def misc_devices(spec: VMSpec) -> list[str]:
    """Balloon and RTC."""
    out: list[str] = []
    if spec.balloon:
        out += ["-device", "virtio-balloon-pci,id=balloon0"]
    if spec.rtc is not None:
        out += ["-rtc", f"base={spec.rtc.base},clock={spec.rtc.clock}"]
    return out
