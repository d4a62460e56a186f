"""Character-device specs as QEMU reads them (``qemu_chr_parse_compat`` in ``chardev/char.c``).

``-serial``, ``-parallel``, ``-monitor``, ``-qmp``, ``-gdb``, ``-debugcon``,
``-qtest`` and slirp's ``guestfwd=`` targets take a spec, not ``-chardev``
options: ``file:P`` and ``pipe:P`` take the whole rest as the path, commas
included; ``unix:P,opts`` and ``tcp:H:P,opts`` take more QemuOpts after the
address; ``COMx`` and ``/dev/...`` are devices opened by that name; ``mon:``
puts a monitor on the chardev. The result is the chardev options QEMU sets.
"""

from __future__ import annotations

import re

from vmdriver.qemu.keyval import OptionSyntaxError, Pair, split_opts


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
