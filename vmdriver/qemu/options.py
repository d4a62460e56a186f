"""What QEMU 7.2's command line is made of: which options take a value, and how it is read.

Facts only; what a job may use is decided in :mod:`vmdriver.policy`. The arity
tables come from the binary itself: ``qemu-system-x86_64 -version -X`` fails
with "requires an argument" exactly when ``-X`` takes one (the same question
:func:`vmdriver.host.features.option_takes_arg` asks of options not listed
here). The value syntaxes follow ``softmmu/vl.c``: which parser each option's
value goes to (``QemuOpts`` or ``keyval``), with which implied first key, and
whether a value starting with ``{`` is JSON.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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


def static_arity(name: str) -> bool | None:
    """Whether QEMU 7.2's ``-name`` takes a value, from the tables; ``None`` if not listed."""
    if name in WITH_ARG:
        return True
    if name in NO_ARG:
        return False
    return None


class Syntax(enum.Enum):
    """How QEMU reads an option's value."""

    #: The whole value is one host file name (``-kernel``, ``-hda``, ``-pidfile``).
    PATH = "path"
    #: ``key=value,...`` read by QemuOpts (``util/qemu-option.c``).
    OPTS = "opts"
    #: ``key=value,...`` read by keyval (``util/keyval.c``): dotted keys.
    KEYVAL = "keyval"
    #: A character-device spec (``file:P``, ``unix:P,server``, ``/dev/ttyS0``, ``mon:stdio``).
    CHARDEV = "chardev"
    #: ``driver.property=value`` (``-global``), else QemuOpts.
    GLOBAL = "global"
    #: ``group.id.key=value`` (``-set``).
    SET = "set"
    #: ``-incoming`` migration URI (``exec:cmd``, ``unix:P``, ``fd:N``, ``tcp:...``).
    URI = "uri"
    #: Free text that names no host file (``-append``, ``-cpu``, ``-uuid``).
    TEXT = "text"


@dataclass(frozen=True)
class ValueSyntax:
    """One option's value syntax."""

    syntax: Syntax
    #: The key a leading element without ``=`` is the value of (QemuOpts' implied
    #: option name when QEMU parses with ``permit_abbrev``, keyval's implied key).
    implied: str | None = None
    #: A value whose first character is ``{`` is JSON (QEMU's dialect: ``'`` quotes too).
    json: bool = False
    #: For :attr:`Syntax.PATH`: the key QEMU stores the path under (``-hda`` → ``file``).
    key: str = ""


def _opts(implied: str | None = None, *, json: bool = False) -> ValueSyntax:
    return ValueSyntax(Syntax.OPTS, implied, json)


def _keyval(implied: str | None = None, *, json: bool = False) -> ValueSyntax:
    return ValueSyntax(Syntax.KEYVAL, implied, json)


def _path(key: str) -> ValueSyntax:
    return ValueSyntax(Syntax.PATH, key=key)


_CHARDEV = ValueSyntax(Syntax.CHARDEV)

#: How QEMU 7.2 reads each option's value (``vl.c``'s option switch). Options
#: not listed take free text. ``-device`` and ``-netdev`` have two readers
#: (JSON, or QemuOpts; ``-netdev stream|dgram`` is keyval): see
#: :func:`vmdriver.qemu.cmdline.option_pairs`.
VALUE_SYNTAX: dict[str, ValueSyntax] = {
    # The block layer: drive_add() stores the whole value as file=.
    **{name: _path("file") for name in
       ("hda", "hdb", "hdc", "hdd", "cdrom", "fda", "fdb", "mtdblock", "sd", "pflash")},
    "kernel": _path("kernel"), "initrd": _path("initrd"), "dtb": _path("dtb"),
    "bios": _path("firmware"), "L": _path("data-dir"), "pidfile": _path("pidfile"),
    "D": _path("logfile"), "mem-path": _path("mem-path"), "chroot": _path("chroot-dir"),
    "readconfig": _path("file"), "writeconfig": _path("file"),
    "dump-vmstate": _path("file"), "qtest-log": _path("logfile"),
    # -k: qemu_find_file() tries the name as a path before the data dirs.
    "k": _path("keymap"),
    "drive": _opts(), "spice": _opts(), "iscsi": _opts(), "rtc": _opts(), "action": _opts(),
    "overcommit": _opts(), "msg": _opts(), "add-fd": _opts(), "smbios": _opts(),
    "semihosting-config": _opts(),
    "chardev": _opts("backend"), "device": _opts("driver", json=True),
    "netdev": _opts("type", json=True), "nic": _opts("type"), "net": _opts("type"),
    "fsdev": _opts("fsdriver"), "virtfs": _opts("fsdriver"), "numa": _opts("type"),
    "m": _opts("size"), "tpmdev": _opts("type"), "mon": _opts("chardev"),
    "accel": _opts("accel"), "acpitable": _opts("data"), "fw_cfg": _opts("name"),
    "icount": _opts("shift"), "option-rom": _opts("romfile"), "name": _opts("guest"),
    "sandbox": _opts("enable"), "trace": _opts("enable"), "plugin": _opts("file"),
    "vnc": _opts("vnc"), "object": _opts("qom-type", json=True),
    "blockdev": _keyval("driver", json=True), "machine": _keyval("type"),
    "M": _keyval("type"), "smp": _keyval("cpus"), "boot": _keyval("order"),
    "display": _keyval("type", json=True), "audiodev": _keyval("driver", json=True),
    "audio": _keyval("driver"), "compat": _keyval(json=True),
    **{name: _CHARDEV for name in
       ("serial", "parallel", "monitor", "qmp", "qmp-pretty", "debugcon", "gdb", "qtest")},
    "global": ValueSyntax(Syntax.GLOBAL), "set": ValueSyntax(Syntax.SET),
    "incoming": ValueSyntax(Syntax.URI),
}

_TEXT = ValueSyntax(Syntax.TEXT)


def value_syntax(name: str) -> ValueSyntax:
    """How QEMU reads the value of ``-name`` (free text if nothing else is known)."""
    return VALUE_SYNTAX.get(name, _TEXT)


#: Options whose value the block layer opens (``proto:`` prefixes are protocols there).
BLOCK_OPTIONS = _words("drive blockdev hda hdb hdc hdd cdrom fda fdb mtdblock sd pflash")

#: Keys (last dotted component, ``_`` read as ``-``) whose value is a host path.
PATH_KEYS = _words("""
    file filename path dir tftp smb kernel initrd dtb dumpdtb firmware splash sysfsdev
    hostdevice vhostdev evdev conf config rendernode sock socket keymap dev
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
#: Keys naming a program QEMU runs (``cmd`` and ``exec`` are vmdriver's names for
#: ``guestfwd=...-cmd:`` and ``-incoming exec:``).
EXEC_KEYS = frozenset({"script", "downscript", "helper", "cmd", "exec"})
#: Keys naming file descriptors QEMU would use.
FD_KEYS = frozenset({"fd", "fds", "vhostfd", "vhostfds", "sock-fd"})


def normalize_key(key: str) -> str:
    """The part of a dotted key that says what it is, spelled one way.

    ``backing.file.filename`` → ``filename``; ``mem_path`` → ``mem-path``
    (QEMU reads ``_`` as ``-`` in machine properties, so both count).
    """
    return key.strip().rsplit(".", 1)[-1].replace("_", "-").lower()


def is_path_key(key: str, option: str) -> bool:
    """True if ``key`` (normalized) names a host path in ``-option``'s value."""
    return (key in PATH_KEYS or key.endswith(PATH_KEY_SUFFIXES)
            or key in OPTION_PATH_KEYS.get(option, ()))
