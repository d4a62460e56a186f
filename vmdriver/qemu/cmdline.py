"""Reading a QEMU command line exactly as QEMU 7.2 reads it: one parser for the whole project.

The walk is ``softmmu/vl.c``'s: an element not starting with ``-`` is a disk
image; ``--x`` is ``-x`` (one dash dropped, no more); anything else that starts
with ``-`` must be an option's exact name (``-drive=x`` and ``-smp `` are not
options: QEMU stops with "invalid option"); an option that takes a value takes
the next element, whatever it looks like.

Values are read by the parser QEMU hands them to (:data:`~vmdriver.qemu.options.VALUE_SYNTAX`):

* QemuOpts (``util/qemu-option.c``): ``key=value`` pairs split at ``,``, where
  ``,,`` is a comma inside a value; a first element without ``=`` is the value
  of the option's implied key (``-netdev user`` → ``type=user``), with ``,,``
  escapes too; any later bare element is a flag (``foo`` → ``foo=on``,
  ``nofoo`` → ``foo=off``);
* keyval (``util/keyval.c``): the same, except that an implied value ends at the
  first ``,`` or ``=`` (no escapes), keys are dotted names, and a bare element
  without an implied key is an error;
* JSON for the options that take it, when the value's first character is ``{``;
* character-device specs (``chardev/char.c``): ``file:P`` and ``pipe:P`` take
  the whole rest as the path, commas included; ``unix:P,opts``, ``tcp:H:P,opts``,
  ``COMx`` and ``/dev/...`` (devices opened by name), ``mon:`` (a monitor on it).

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
from vmdriver.qemu.options import Syntax, static_arity, value_syntax

#: ``name -> True/False`` (takes a value or not), ``None`` if QEMU has no such option.
Arity = Callable[[str], bool | None]
#: One value in a ``key=value`` reading (JSON values keep their type).
Scalar = str | int | float | bool | None
Pair = tuple[str, Scalar]


class OptionSyntaxError(ValueError):
    """A value QEMU would refuse to parse (it exits before doing anything)."""


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


def parse_argv(argv: Sequence[str], arity: Arity = static_arity) -> tuple[Element, ...]:
    """Walk ``argv`` (without the binary) as ``vl.c`` does; stop where QEMU would."""
    out: list[Element] = []
    i = 0
    while i < len(argv):
        name = option_name(argv[i])
        if name is None:
            out.append(Element(i, Kind.IMAGE, value=argv[i]))
            i += 1
            continue
        takes = arity(name) if name else None
        if takes is None:
            out.append(Element(i, Kind.UNKNOWN, name))
            break
        if takes and i + 1 >= len(argv):
            out.append(Element(i, Kind.MISSING_VALUE, name))
            break
        out.append(Element(i, Kind.OPTION, name, argv[i + 1] if takes else None))
        i += 2 if takes else 1
    return tuple(out)


def has_option(argv: Sequence[str], name: str, arity: Arity = static_arity) -> bool:
    """True if QEMU reads ``-name`` (given with or without its dash) as an option in ``argv``."""
    want = name[1:] if name.startswith("-") else name
    return any(e.kind is Kind.OPTION and e.name == want for e in parse_argv(argv, arity))


# Section: QemuOpts and keyval


def _opts_value(text: str, i: int) -> tuple[str, int]:
    """QEMU's ``get_opt_value``: up to a single ``,``; ``,,`` is a comma. Returns (value, end)."""
    out: list[str] = []
    n = len(text)
    while i < n:
        if text[i] == ",":
            if i + 1 < n and text[i + 1] == ",":
                out.append(",")
                i += 2
                continue
            break
        out.append(text[i])
        i += 1
    return "".join(out), i


def split_opts(text: str, implied: str | None = None) -> list[Pair]:
    """``key=value,...`` as QemuOpts reads it (``opts_do_parse``)."""
    pairs: list[Pair] = []
    i, n = 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] not in "=,":
            j += 1
        if j < n and text[j] == "=":
            value, end = _opts_value(text, j + 1)
            pairs.append((text[i:j], value))
        elif implied is not None:
            value, end = _opts_value(text, i)
            pairs.append((implied, value))
        else:
            name, end = text[i:j], j
            pairs.append((name[2:], "off") if name.startswith("no") else (name, "on"))
        implied = None
        i = end + 1
    return pairs


_QAPI_NAME = re.compile(r"(?:__[A-Za-z0-9.-]*_)?[A-Za-z][A-Za-z0-9_-]*")


def _keyval_key(key: str) -> None:
    """Refuse a key keyval would refuse ("Invalid parameter")."""
    pos, first = 0, True
    while True:
        m = re.compile(r"[0-9]+").match(key, pos) if not first else None
        m = m or _QAPI_NAME.match(key, pos)
        if m is None or m.end() - pos > 127:
            raise OptionSyntaxError(f"Invalid parameter '{key}'")
        pos, first = m.end(), False
        if pos == len(key):
            return
        if key[pos] != ".":
            raise OptionSyntaxError(f"Invalid parameter '{key}'")
        pos += 1


def split_keyval(text: str, implied: str | None = None) -> list[Pair]:
    """``key=value,...`` as keyval reads it (``keyval_parse``); raises :class:`OptionSyntaxError`."""
    pairs: list[Pair] = []
    i, n = 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] not in "=,":
            j += 1
        bare = j > i and (j == n or text[j] != "=")
        if bare and text[i:j] in ("help", "?"):
            i = j + 1
        elif bare and implied is not None:
            pairs.append((implied, text[i:j]))
            i = j + 1
        else:
            _keyval_key(text[i:j])
            if j == n or text[j] != "=":
                raise OptionSyntaxError(f"Expected '=' after parameter '{text[i:j]}'")
            value, end = _opts_value(text, j + 1)
            pairs.append((text[i:j], value))
            i = end + 1
        implied = None
    return pairs


def _json(text: str) -> list[Pair]:
    try:
        data = qjson.parse(text)
    except qjson.JSONSyntaxError as exc:
        raise OptionSyntaxError(f"not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise OptionSyntaxError("JSON value must be an object")
    return qjson.flatten(data)


# Section: character devices


def chardev_spec(text: str, *, mon_ok: bool = True) -> list[Pair]:
    """The chardev options QEMU makes of a spec (``qemu_chr_parse_compat``).

    ``chardev:ID`` (an existing chardev) gives ``chardev=ID``; ``mon:`` gives the
    pseudo key ``mon=on`` (QEMU puts a monitor on that chardev).
    """
    if text.startswith("chardev:"):
        return [("chardev", text[8:])]
    pairs: list[Pair] = []
    if text.startswith("mon:"):
        if not mon_ok:
            raise OptionSyntaxError("mon: isn't supported in this context")
        text = text[4:]
        pairs.append(("mon", "on"))
    return pairs + _chardev_backend(text)


def _chardev_backend(text: str) -> list[Pair]:
    if text in ("null", "pty", "msmouse", "wctablet", "braille", "testdev", "stdio"):
        return [("backend", text)]
    if text.startswith("vc"):
        rest = text[2:]
        m = re.match(r"([0-9]{1,7})(C?)x([0-9]{1,7})C?", rest[1:]) if rest[:1] == ":" else None
        if rest[:1] == ":" and m is None:
            raise OptionSyntaxError(f"'{text}' is not a valid char driver")
        return [("backend", "vc")]
    if text == "con:":
        return [("backend", "console")]
    for prefix, backend in (("COM", "serial"), ("/dev/parport", "parallel"),
                            ("/dev/ppi", "parallel"), ("/dev/", "serial")):
        if text.startswith(prefix):
            return [("backend", backend), ("path", text)]
    for prefix in ("file:", "pipe:"):
        if text.startswith(prefix):
            return [("backend", prefix[:-1]), ("path", text[len(prefix):])]
    if text.startswith("unix:"):
        return [("backend", "socket"), *split_opts(text[5:], "path")]
    for prefix in ("tcp:", "telnet:", "tn3270:", "websocket:", "udp:"):
        if text.startswith(prefix):
            return _inet_chardev(prefix[:-1], text[len(prefix):])
    raise OptionSyntaxError(f"'{text}' is not a valid char driver")


def _inet_chardev(kind: str, rest: str) -> list[Pair]:
    """``[host]:port[,opts]`` (``udp``: ``[host]:port[@[host]:port]``), as QEMU's sscanf reads it."""
    stop = "@," if kind == "udp" else ","
    m = re.match(rf"([^:]{{1,64}}):([^{stop}]{{1,32}})", rest) or \
        re.match(rf"():([^{stop}]{{1,32}})", rest)
    if m is None:
        raise OptionSyntaxError(f"'{kind}:{rest}' is not a valid char driver")
    pairs: list[Pair] = [("backend", "udp" if kind == "udp" else "socket"),
                         ("host", m.group(1)), ("port", m.group(2))]
    tail = rest[m.end():]
    if kind != "udp" and tail.startswith(","):
        pairs += split_opts(tail[1:])
    return pairs


def guestfwd(text: str) -> list[Pair]:
    """``[tcp]:[server]:port-target`` (slirp): the target is ``cmd:PROG`` or a chardev spec."""
    m = re.match(r"([^:]*):([^:]*):([^-]*)-", text)
    if m is None or m.group(1) not in ("", "tcp"):
        raise OptionSyntaxError(f"invalid guest forwarding rule '{text}'")
    target = text[m.end():]
    if target.startswith("cmd:"):
        return [("cmd", target[4:])]
    return chardev_spec(target)


# Section: whole values


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
        elif name == "initrd":
            out += [("initrd", m.split(" ", 1)[0]) for m in multiboot_modules(val)
                    if m.split(" ", 1)[0] != val]
    if name == "spice" and last.get("unix") == "on" and isinstance(last.get("addr"), str):
        out.append(("addr.path", last["addr"]))
    return out


def multiboot_modules(initrd: str) -> list[str]:
    """A multiboot kernel's ``-initrd``: modules split at ``,`` (``,,`` escapes), each with args."""
    modules, i = [], 0
    while True:
        module, i = _opts_value(initrd, i)
        modules.append(module)
        if i >= len(initrd):
            return modules
        i += 1
