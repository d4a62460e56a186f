"""What vmdriver knows about QEMU's command-line options, for checking a job's ``args``.

Facts, not policy: which options take a value, which read a whole path, which
use the character-device spec (``file:/x``, ``unix:/x``, ``/dev/x``), and which
keys inside ``key=value,...`` values name host files. The tables were taken from
QEMU 7.2 itself: ``qemu-system-x86_64 -version -X`` fails with "requires an
argument" exactly when ``-X`` takes one (see :func:`vmdriver.host.features.option_takes_arg`,
which asks the binary about options not listed here).
"""

from __future__ import annotations


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: Options that take no value (QEMU 7.2).
NO_ARG = _words("""
    S async-teardown audio-help daemonize enable-kvm enable-sync-profile full-screen h help
    mem-prealloc no-acpi no-fd-bootchk no-hpet no-reboot no-shutdown no-user-config nodefaults
    nographic old-param only-migratable portrait preconfig s semihosting singlestep snapshot usb
    version win2k-hack xen-attach xen-domid-restrict
""")

#: Options that take a value (QEMU 7.2, plus ``writeconfig`` of older versions).
WITH_ARG = _words("""
    D L M accel acpitable action add-fd append audio audiodev bios blockdev boot cdrom chardev
    chroot compat cpu d debugcon device dfilter display drive dtb dump-vmstate echr fda fdb
    fsdev fw_cfg g gdb global hda hdb hdc hdd icount incoming initrd iscsi k kernel loadvm m
    machine mem-path mon monitor msg mtdblock name net netdev nic numa object option-rom
    overcommit parallel pflash pidfile plugin prom-env qmp qmp-pretty qtest qtest-log readconfig
    rotate rtc runas sandbox sd seed semihosting-config serial set smbios smp spice tpmdev trace
    usbdevice uuid vga virtfs vnc watchdog-action writeconfig xen-domid
""")

#: Options refused unless ``args_allowlist`` names them, even when it is empty,
#: and why: each reads more options, opens a control channel that can open any
#: file, runs a program, hands over file descriptors, or undoes vmdriver's controls.
REFUSED_UNLESS_LISTED: dict[str, str] = {
    "readconfig": "reads more options from a file",
    "writeconfig": "writes a config file",
    "set": "changes any option, paths included",
    "global": "sets device properties, file paths (romfile) included",
    "add-fd": "hands QEMU file descriptors",
    "monitor": "opens a monitor, which can open any host file",
    "mon": "opens a monitor, which can open any host file",
    "qmp": "opens a monitor, which can open any host file",
    "qmp-pretty": "opens a monitor, which can open any host file",
    "qtest": "opens a test channel that controls the machine",
    "incoming": "can run a shell command (exec:)",
    "plugin": "loads a shared library into QEMU",
    "daemonize": "lets QEMU leave vmdriver's supervision",
    "sandbox": "vmdriver sets the seccomp sandbox itself",
}

#: Options whose whole value is a host path (QEMU opens it as written, relative
#: paths from the task dir).
WHOLE_PATH = _words("""
    kernel initrd dtb bios L pidfile D mem-path chroot hda hdb hdc hdd cdrom fda fdb mtdblock sd
    pflash readconfig writeconfig dump-vmstate qtest-log option-rom
""")

#: Of those, the ones the block layer opens (where ``proto:`` prefixes mean protocols).
BLOCK_WHOLE_PATH = _words("""
    hda hdb hdc hdd cdrom fda fdb mtdblock sd pflash
""")

#: Options whose value is a character-device spec: ``file:P``, ``pipe:P``, ``unix:P``,
#: ``/dev/...``, ``mon:<spec>``, ``tcp:...``, ``stdio`` ...
CHARDEV_SPEC = _words("""
    serial parallel monitor qmp qmp-pretty debugcon gdb qtest
""")

#: Options whose value is ``key=value,...`` (or JSON, for those QEMU allows it).
KEYVAL = _words("""
    drive blockdev device object netdev nic net chardev fsdev virtfs fw_cfg smbios acpitable
    audiodev audio tpmdev machine M trace icount spice boot display compat plugin iscsi numa
    accel name overcommit rtc semihosting-config msg action smp m cpu global set add-fd vnc
    sandbox
""")

#: Keyval options whose first bare element is a path (``-plugin lib.so,arg=x``).
IMPLIED_PATH_FIRST = frozenset({"plugin"})

#: Keys (last dotted component, ``_`` read as ``-``) whose value is a host path.
PATH_KEYS = _words("""
    file filename path dir tftp smb kernel initrd dtb dumpdtb firmware splash sysfsdev
    hostdevice vhostdev evdev conf config rendernode sock
""")
#: Key endings that mark a host path too: ``romfile``, ``logfile``, ``x509-dir``, ``mem-path``.
PATH_KEY_SUFFIXES = ("file", "path", "dir", "filename")
#: Extra path keys of one option.
OPTION_PATH_KEYS: dict[str, frozenset[str]] = {
    "acpitable": frozenset({"data"}),
    "trace": frozenset({"events"}),
}
#: Keys whose path is one the block layer opens (protocol prefixes apply).
BLOCK_KEYS = frozenset({"file", "filename"})
#: Keyval options the block layer reads (``file=nbd:...`` is a protocol there).
BLOCK_KEYVAL = frozenset({"drive", "blockdev"})
#: Keys naming a program QEMU runs: only ``no`` (or empty) is allowed.
EXEC_KEYS = frozenset({"script", "downscript", "helper"})
#: Keys naming file descriptors: vmdriver's fds are the only ones QEMU inherits.
FD_KEYS = frozenset({"fd", "fds", "vhostfd", "vhostfds"})
#: Chardev-spec prefixes followed by a host path.
CHARDEV_PATH_PREFIXES = ("file:", "pipe:", "unix:")


def is_path_key(key: str, option: str) -> bool:
    """True if ``key`` (normalized) names a host path in ``-option``'s value."""
    return (key in PATH_KEYS or key.endswith(PATH_KEY_SUFFIXES)
            or key in OPTION_PATH_KEYS.get(option, ()))


def normalize_key(key: str) -> str:
    """The part of a dotted key that says what it is, spelled one way.

    ``backing.file.filename`` → ``filename``; ``mem_path`` → ``mem-path``
    (QEMU reads ``_`` as ``-`` in machine properties, so both count).
    """
    return key.strip().rsplit(".", 1)[-1].replace("_", "-").lower()
