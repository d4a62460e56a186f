"""QEMU's two ``key=value,...`` parsers: QemuOpts (``util/qemu-option.c``) and keyval (``util/keyval.c``).

Both split at ``,`` and read ``,,`` as a comma inside a value. They differ at
the edges, and QEMU uses each for different options (see
:data:`vmdriver.qemu.options.VALUE_SYNTAX`):

* QemuOpts: a first element without ``=`` is the value of the option's implied
  key, with ``,,`` escapes; a later bare element is a flag (``foo`` → ``foo=on``,
  ``nofoo`` → ``foo=off``); keys are anything up to ``=`` or ``,``;
* keyval: an implied value ends at the first ``,`` or ``=`` (no escapes); keys
  are dotted QAPI names; a bare element without an implied key is an error.
"""

from __future__ import annotations

import re

#: One value in a ``key=value`` reading (JSON values keep their type).
Scalar = str | int | float | bool | None
Pair = tuple[str, Scalar]


class OptionSyntaxError(ValueError):
    """A value QEMU would refuse to parse (it exits before doing anything)."""


def opts_value(text: str, i: int) -> tuple[str, int]:
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
            value, end = opts_value(text, j + 1)
            pairs.append((text[i:j], value))
        elif implied is not None:
            value, end = opts_value(text, i)
            pairs.append((implied, value))
        else:
            name, end = text[i:j], j
            pairs.append((name[2:], "off") if name.startswith("no") else (name, "on"))
        implied = None
        i = end + 1
    return pairs


_INDEX = re.compile(r"[0-9]+")
_QAPI_NAME = re.compile(r"(?:__[A-Za-z0-9.-]*_)?[A-Za-z][A-Za-z0-9_-]*")


def _keyval_key(key: str) -> None:
    """Refuse a key keyval would refuse ("Invalid parameter")."""
    pos, first = 0, True
    while True:
        m = _INDEX.match(key, pos) if not first else None
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
            value, end = opts_value(text, j + 1)
            pairs.append((text[i:j], value))
            i = end + 1
        implied = None
    return pairs
