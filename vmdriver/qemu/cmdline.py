"""Reading a QEMU command line exactly as QEMU 7.2 reads it: one parser for the whole project.

The walk is ``softmmu/vl.c``'s: an element not starting with ``-`` is a disk
image; ``--x`` is ``-x`` (one dash dropped, no more); anything else that starts
with ``-`` must be an option's exact name (``-drive=x`` and ``-smp `` are not
options: QEMU stops with "invalid option"); an option that takes a value takes
the next element, whatever it looks like.

Values are read by the parser QEMU hands them to (:data:`~vmdriver.qemu.options.VALUE_SYNTAX`):
QemuOpts or keyval (:mod:`vmdriver.qemu.keyval`: ``,,`` is a comma, and each has
its own rule for a leading element without ``=``), QEMU's JSON dialect
(:mod:`vmdriver.qemu.qjson`) for the options that take it when the value's first
character is ``{``, and character-device specs (:mod:`vmdriver.qemu.chardev`:
``file:P`` takes the whole rest, commas included).

:func:`option_pairs` gives every value as flat ``(dotted key, value)`` pairs in
QEMU's reading, with the sub-syntaxes inside values (``guestfwd=...-file:P``,
``vnc=unix:P``, ``-acpitable file=a:b``, multiboot ``-initrd`` lists) spelled
out as extra pairs, so a caller sees every host file, program and fd a value names.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmdriver.qemu import qjson
from vmdriver.qemu.chardev import chardev_spec, guestfwd
from vmdriver.qemu.keyval import (
    OptionSyntaxError,
    Pair,
    Scalar,
    opts_value,
    split_keyval,
    split_opts,
)
from vmdriver.qemu.options import Syntax, static_arity, value_syntax

__all__ = ["Arity", "Element", "Kind", "OptionSyntaxError", "Pair", "Scalar", "arity_of",
           "chardev_spec", "dbus_unix_paths", "guestfwd", "has_option", "multiboot_modules",
           "option_name", "option_pairs", "parse_argv", "split_keyval", "split_opts"]

#: ``name -> True/False`` (takes a value or not), ``None`` if QEMU has no such option.
Arity = Callable[[str], bool | None]


class Kind(enum.Enum):
    """What QEMU makes of one argv element."""

    OPTION = "option"
    #: Not starting with ``-``: a disk image (``-hda``).
    IMAGE = "image"
    #: Starts with ``-`` but names no option: QEMU stops ("invalid option").
    UNKNOWN = "unknown"
    #: The last element is an option that needs a value: QEMU stops.
    MISSING_VALUE = "missing value"


@dataclass(frozen=True)
class Element:
    """One option (with its value) or disk image, where it sits in argv."""

    index: int
    kind: Kind
    #: The option's name without dashes (``""`` for an image).
    name: str = ""
    #: The option's value, or the image's file name.
    value: str | None = None

    @property
    def value_index(self) -> int:
        """Where the value sits in argv (an image is its own value)."""
        return self.index + 1 if self.kind is Kind.OPTION else self.index


def option_name(arg: str) -> str | None:
    """The option name QEMU looks up for ``arg``, or ``None`` if ``arg`` is a disk image."""
    if not arg.startswith("-"):
        return None
    return arg[2:] if arg.startswith("--") else arg[1:]


def arity_of(name: str, ask: Arity | None = None) -> bool | None:
    """Whether ``-name`` takes a value: the tables first, then ``ask`` (e.g. the binary).

    ``ask`` is how a newer QEMU's options are learnt:
    ``functools.partial(vmdriver.host.features.option_takes_arg, binary)``.
    """
    known = static_arity(name)
    return known if known is not None or ask is None else ask(name)


def parse_argv(argv: Sequence[str], ask: Arity | None = None) -> tuple[Element, ...]:
    """Walk ``argv`` (without the binary) as ``vl.c`` does; stop where QEMU would.

    Options missing from the tables are looked up with ``ask`` (see :func:`arity_of`).
    """
    out: list[Element] = []
    i = 0
    while i < len(argv):
        name = option_name(argv[i])
        if name is None:
            out.append(Element(i, Kind.IMAGE, value=argv[i]))
            i += 1
            continue
        takes = arity_of(name, ask) if name else None
        if takes is None:
            out.append(Element(i, Kind.UNKNOWN, name))
            break
        if takes and i + 1 >= len(argv):
            out.append(Element(i, Kind.MISSING_VALUE, name))
            break
        out.append(Element(i, Kind.OPTION, name, argv[i + 1] if takes else None))
        i += 2 if takes else 1
    return tuple(out)


def has_option(argv: Sequence[str], name: str, ask: Arity | None = None) -> bool:
    """True if QEMU reads ``-name`` (given with or without its dash) as an option in ``argv``."""
    want = name[1:] if name.startswith("-") else name
    return any(e.kind is Kind.OPTION and e.name == want for e in parse_argv(argv, ask))


# Section: values


def _json(text: str) -> list[Pair]:
    try:
        data = qjson.parse(text)
    except qjson.JSONSyntaxError as exc:
        raise OptionSyntaxError(f"not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise OptionSyntaxError("JSON value must be an object")
    return qjson.flatten(data)


def option_pairs(name: str, value: str) -> list[Pair]:
    """Every ``(dotted key, value)`` QEMU reads from ``-name value``.

    Raises :class:`OptionSyntaxError` where QEMU would refuse the value.
    """
    syntax = value_syntax(name)
    kind = syntax.syntax
    if name == "display" and value.startswith("vnc"):
        if not value.startswith("vnc="):
            raise OptionSyntaxError("VNC requires a display argument vnc=<display>")
        name, value, kind = "vnc", value[4:], Syntax.OPTS
        syntax = value_syntax("vnc")
    if syntax.json and value.startswith("{"):
        pairs = _json(value)
    elif name == "netdev" and _netdev_is_modern(value):
        pairs = split_keyval(value, "type")
    elif kind is Syntax.OPTS:
        pairs = split_opts(value, syntax.implied)
    elif kind is Syntax.KEYVAL:
        pairs = split_keyval(value, syntax.implied)
    elif kind is Syntax.PATH:
        pairs = [(syntax.key, value)]
    else:
        pairs = _special(name, kind, value)
    return _expand(name, pairs)


def _netdev_is_modern(value: str) -> bool:
    """``-netdev stream|dgram`` goes to keyval (``netdev_is_modern``)."""
    types = [v for k, v in split_opts(value, "type") if k == "type"]
    return bool(types) and types[-1] in ("stream", "dgram")


def _special(name: str, kind: Syntax, value: str) -> list[Pair]:
    if kind is Syntax.CHARDEV:
        if value == "none" or (name == "monitor" and value.startswith("none")):
            return []
        return chardev_spec(value, mon_ok=name != "qtest")
    if kind is Syntax.GLOBAL:
        m = re.match(r"([^.=]{1,63})\.([^=]{1,63})=", value)
        if m:
            return [(f"{m.group(1)}.{m.group(2)}", value[m.end():])]
        got = dict(split_opts(value))
        if not all(isinstance(got.get(k), str) for k in ("driver", "property", "value")):
            raise OptionSyntaxError("options 'driver', 'property', and 'value' are required")
        return [(f"{got['driver']}.{got['property']}", got["value"])]
    if kind is Syntax.SET:
        m = re.match(r"([^.]{1,63})\.([^.]{1,63})\.([^=]{1,63})=", value)
        if m is None:
            raise OptionSyntaxError(f'can\'t parse: "{value}"')
        return [(".".join(m.groups()), value[m.end():])]
    if kind is Syntax.URI:
        for prefix, key in (("exec:", "exec"), ("unix:", "path"), ("fd:", "fd")):
            if value.startswith(prefix):
                return [(key, value[len(prefix):])]
        return [("uri", value)]
    return [(name, value)]


#: What QEMU's boolean options read as true (``qapi_bool_parse``).
_TRUE = ("on", "yes", "true", "y")


def _expand(name: str, pairs: list[Pair]) -> list[Pair]:
    """Add the pairs hidden inside values: forward targets, unix sockets, file lists, fds."""
    out = list(pairs)
    last = {key: val for key, val in pairs}
    for key, val in pairs:
        leaf = key.rsplit(".", 1)[-1]
        if not isinstance(val, str):
            continue
        if leaf == "guestfwd" and name in ("netdev", "net", "nic"):
            out += [(f"{key}.{k}", v) for k, v in guestfwd(val)]
        elif leaf == "vnc" and name == "vnc" and val.startswith("unix:"):
            out.append(("vnc.path", val[5:]))
        elif name == "acpitable" and leaf in ("file", "data") and ":" in val:
            out += [(key, part) for part in val.split(":")]
        elif leaf == "type" and val == "fd" and isinstance(last.get(f"{key[:-4]}str"), str):
            out.append((f"{key[:-4]}fd", last[f"{key[:-4]}str"]))
        elif leaf == "server" and name in ("audiodev", "audio") and val.startswith(("/", "unix:")):
            # A PulseAudio server: "unix:/path" or a bare socket path.
            out.append((f"{key}.path", val.removeprefix("unix:")))
        elif leaf == "addr" and name == "display":
            out += [(f"{key}.path", p) for p in dbus_unix_paths(val)]
        elif name == "initrd":
            out += [("initrd", m.split(" ", 1)[0]) for m in multiboot_modules(val)
                    if m.split(" ", 1)[0] != val]
    if name == "spice" and last.get("unix") in _TRUE and isinstance(last.get("addr"), str):
        out.append(("addr.path", last["addr"]))
    return out


def multiboot_modules(initrd: str) -> list[str]:
    """A multiboot kernel's ``-initrd``: modules split at ``,`` (``,,`` escapes), each with args."""
    modules, i = [], 0
    while True:
        module, i = opts_value(initrd, i)
        modules.append(module)
        if i >= len(initrd):
            return modules
        i += 1


def dbus_unix_paths(address: str) -> list[str]:
    """Files a D-Bus address names (``unix:path=P``, ``dir=``, ``tmpdir=``; ``;`` between)."""
    paths = []
    for part in address.split(";"):
        transport, _, params = part.partition(":")
        if transport != "unix":
            continue
        for item in params.split(","):
            key, _, val = item.partition("=")
            if key in ("path", "dir", "tmpdir") and val:
                paths.append(val)
    return paths
