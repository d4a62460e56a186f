"""The options and keys a job may use when the operator set no ``args_allowlist``.

A denylist always misses the next spelling, so without an allowlist the args
are default-deny: an option must be in :data:`SAFE_OPTIONS`, and every key of
its value (in QEMU's own reading, :func:`vmdriver.qemu.cmdline.option_pairs`)
must be one the option's :class:`Rule` lists, with a listed value where the
rule names the values. The set is what Nomad ``qemu`` jobs use: CPU model and
topology, display and VGA, the devices of an ordinary PC, user-mode networking
without host-side services, local image files in image formats, ``fw_cfg``
strings, boot and clock settings, a kernel with its initrd and command line.

What the set leaves out opens host files or sockets (chardev backends other
than files in the task dir, ``-vnc``, ``-spice``, ``-audiodev``), talks to the
network from the host (block drivers other than local files, ``-netdev``
other than ``user``, ``hostfwd``/``guestfwd``), passes host devices through,
or undoes vmdriver's own settings (``-accel``, ``-machine accel=``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmdriver.qemu.cmdline import Scalar


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())

#: Image formats QEMU reads from a local file (no protocol, no external files of their own).
IMAGE_FORMATS = frozenset({"raw", "qcow2", "qcow", "qed", "vmdk", "vdi", "vhdx", "vpc"})

#: Block drivers that make the *host* open a network connection (SSRF) or a host
#: device by address: refused everywhere, allowlist or not.
NETWORK_BLOCK_DRIVERS = frozenset({
    "http", "https", "ftp", "ftps", "nbd", "iscsi", "ssh", "gluster", "rbd", "nfs", "curl",
    "sheepdog", "vxhs", "libiscsi", "nvme", "nvme-io_uring", "blkio", "virtio-blk-vhost-user",
    "virtio-blk-vhost-vdpa", "virtio-blk-vfio-pci", "io_uring", "host_device", "host_cdrom",
    "vvfat", "blkdebug", "blkverify", "quorum", "replication",
})

#: Devices of an ordinary VM: NICs, disks and controllers, consoles, input, display,
#: RNG, balloon, watchdogs, PCI(e) bridges. None opens a host file by itself. The last
#: line: QEMU's short aliases of the virtio PCI devices (``qdev_alias_table``).
SAFE_DEVICES = _words("""
    virtio-net-pci virtio-net-pci-non-transitional virtio-net-pci-transitional virtio-net-device
    e1000 e1000e e1000-82544gc e1000-82545em rtl8139 ne2k_pci pcnet vmxnet3 i82559er
    virtio-blk-pci virtio-blk-pci-non-transitional virtio-blk-device virtio-scsi-pci
    virtio-scsi-device scsi-hd scsi-cd ide-hd ide-cd nvme ich9-ahci ahci lsi53c895a megasas
    usb-storage floppy
    virtio-rng-pci virtio-rng-device virtio-balloon-pci virtio-balloon-device
    virtio-serial-pci virtio-serial-device virtserialport virtconsole isa-serial pci-serial
    virtio-keyboard-pci virtio-mouse-pci virtio-tablet-pci usb-tablet usb-kbd usb-mouse usb-hub
    qemu-xhci nec-usb-xhci usb-ehci ich9-usb-ehci1 ich9-usb-uhci1 piix3-usb-uhci piix4-usb-uhci
    VGA virtio-vga virtio-gpu-pci virtio-gpu-device cirrus-vga bochs-display ramfb qxl-vga qxl
    secondary-vga
    i6300esb ib700 pvpanic pvpanic-pci isa-debug-exit sga
    pcie-root-port pci-bridge pcie-pci-bridge ioh3420 x3130-upstream xio3130-downstream
    virtio-net virtio-blk virtio-scsi virtio-rng virtio-balloon virtio-serial virtio-gpu
    virtio-keyboard virtio-mouse virtio-tablet
""")

#: Device properties that name other front ends, addresses, identities and tuning:
#: never a host file, program or fd.
DEVICE_KEYS = _words("""
    driver id bus addr multifunction rombar netdev mac mq vectors host-mtu speed duplex
    drive serial bootindex share-rw scsi-id lun channel unit logical-block-size
    physical-block-size min-io-size opt-io-size discard-granularity write-cache rotation-rate
    wwn ver model num-queues queue-size iothread disable-legacy disable-modern chardev name nr
    rng max-bytes period chassis slot port xres yres vgamem-mb edid max-outputs ram-size
    vram-size iobase iosize event-idx indirect-desc packed ioeventfd deflate-on-oom
    free-page-reporting romsize x-pcie-lnksta-dllla pcie-extcap-init bootindex-fallback
    cyls heads secs lcyls lheads lsecs trans removable physical_block_size
""")

#: Slirp settings that stay inside the VM's own network (no host service, no host port).
USER_NET_KEYS = _words("""
    type id net host ipv4 ipv6 ipv6-net ipv6-host ipv6-prefix ipv6-prefixlen restrict hostname
    dhcpstart dns ipv6-dns dnssearch domainname model mac
""")

#: Keys of ``-drive`` that say how a local image is attached.
DRIVE_KEYS = _words("""
    file if index media format id cache aio discard snapshot readonly read-only serial werror
    rerror bus unit detect-zeroes copy-on-read cyls heads secs trans node-name
    cache.direct cache.no-flush auto-read-only
""")

#: Keys of a ``-blockdev`` node (and of its ``file.``/``backing.`` children).
BLOCKDEV_KEYS = _words("""
    driver node-name filename file backing read-only auto-read-only discard detect-zeroes
    cache.direct cache.no-flush force-share locking aio
""")


@dataclass(frozen=True)
class Rule:
    """What one option may hold without an allowlist."""

    #: Keys allowed in the value (normalized: lowercase, ``_`` read as ``-``).
    keys: frozenset[str] = frozenset()
    #: For some keys, the only values allowed (compared lowercased).
    values: dict[str, frozenset[str]] = field(default_factory=dict)
    #: Key prefixes that name child nodes (``file.``, ``backing.`` of a ``-blockdev``).
    children: tuple[str, ...] = ()


def _keys(text: str, **values: frozenset[str]) -> Rule:
    return Rule(_words(text), {k.replace("_", "-"): v for k, v in values.items()})


def _one_of(text: str) -> frozenset[str]:
    return _words(text)


_FLAG = Rule()
#: The whole value is free text (``-append``, ``-cpu``) or one path (``-kernel``).
_ANY_TEXT = Rule(frozenset({"*"}))

SAFE_OPTIONS: dict[str, Rule] = {
    **{flag: _FLAG for flag in _words(
        "nographic nodefaults no-reboot no-shutdown snapshot no-hpet no-acpi usb no-user-config "
        "mem-prealloc no-fd-bootchk")},
    "cpu": _ANY_TEXT, "append": _ANY_TEXT, "uuid": _ANY_TEXT,
    # Paths: the path policy decides where they may lead.
    "kernel": _keys("kernel"), "initrd": _keys("initrd"), "dtb": _keys("dtb"),
    "smp": _keys("cpus sockets dies clusters cores threads maxcpus"),
    "m": _keys("size"),
    "vga": Rule(frozenset({"vga"}), {"vga": _one_of("std cirrus vmware qxl virtio none")}),
    "display": _keys("type", type=_one_of("none")),
    "usbdevice": Rule(frozenset({"usbdevice"}), {"usbdevice": _one_of("tablet mouse keyboard")}),
    "device": Rule(DEVICE_KEYS, {"driver": SAFE_DEVICES}),
    "netdev": Rule(USER_NET_KEYS, {"type": _one_of("user")}),
    "nic": Rule(USER_NET_KEYS, {"type": _one_of("user none")}),
    "drive": Rule(DRIVE_KEYS, {"format": IMAGE_FORMATS,
                               "if": _one_of("ide scsi virtio none floppy sd pflash mtd")}),
    "blockdev": Rule(BLOCKDEV_KEYS, {"driver": IMAGE_FORMATS | {"file"}},
                     children=("file.", "backing.")),
    "fw_cfg": _keys("name string file"),
    "boot": _keys("order once menu strict reboot-timeout splash-time"),
    "rtc": _keys("base clock driftfix"),
    "machine": _keys("type usb graphics vmport smm hpet pit acpi kernel-irqchip i8042 sata pic "
                     "suppress-vmdesc dump-guest-core mem-merge"),
    "M": _keys("type"),
    "object": _keys("qom-type id filename size merge dump prealloc",
                    qom_type=_one_of("rng-random rng-builtin iothread memory-backend-ram")),
    "name": _keys("guest"),
    "serial": _keys("backend chardev", backend=_one_of("stdio null")),
    "chardev": _keys("backend id path server wait size",
                     backend=_one_of("null socket file ringbuf")),
    "smbios": _keys("type vendor version date release manufacturer product serial uuid sku "
                    "family asset location part speed uefi value"),
    "msg": _keys("timestamp guest-name"),
    "action": _keys("reboot shutdown panic watchdog"),
    "watchdog-action": _ANY_TEXT,
    "overcommit": _keys("cpu-pm", cpu_pm=_one_of("off")),
}


def safe_key(rule: Rule, key: str) -> str | None:
    """The key as the rule names it, or ``None`` if the rule does not allow it.

    ``key`` is normalized; child prefixes (``file.``, ``backing.file.``) are
    dropped first, so a child node is held to the same keys as its parent.
    """
    while rule.children and key.startswith(rule.children):
        key = key.split(".", 1)[1]
    if "*" in rule.keys or key in rule.keys:
        return key
    return None


def value_allowed(rule: Rule, key: str, value: Scalar) -> bool:
    """True unless the rule lists the values of ``key`` and ``value`` is not one of them."""
    allowed = rule.values.get(key)
    if allowed is None:
        return True
    return isinstance(value, str) and (value in allowed or value.lower() in allowed)


def fw_cfg_name_ok(value: Scalar) -> bool:
    """``-fw_cfg`` names a job may set: only the ``opt/`` space QEMU leaves to users."""
    return isinstance(value, str) and value.startswith("opt/") and ".." not in value
