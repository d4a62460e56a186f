"""Parsing of the scalar units jobs and configs use: sizes, durations, ports, names.

Each parser raises :class:`~vmdriver.errors.SpecError` naming what it expected,
so a caller only adds *where* the value came from.
"""

from __future__ import annotations

import re

from vmdriver.errors import SpecError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}

SIZE_HELP = "a byte count or a size like 512MiB, 10GiB, 20GB"
DURATION_HELP = "a duration like 500ms, 30s, 5m, 1h30m, or a number of seconds"

_DUR_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DUR_SCALE = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$", re.IGNORECASE)


def parse_size(value: object, *, where: str = "", default_unit: str = "") -> int:
    """Return a size in bytes.

    ``10GiB`` and ``10G`` are binary (2^30); ``10GB`` is decimal (10^9), as in
    Nomad's ``humanize`` sizes. A bare number is bytes unless ``default_unit``
    (e.g. ``"MiB"``) says otherwise.
    """
    if isinstance(value, bool):
        raise SpecError("expected a size", where=where, value=value, allowed=SIZE_HELP)
    if isinstance(value, int):
        text = f"{value}{default_unit}"
    elif isinstance(value, str):
        text = value if not value.strip().isdigit() else f"{value.strip()}{default_unit}"
    else:
        raise SpecError("expected a size", where=where, value=value, allowed=SIZE_HELP)
    m = _SIZE_RE.match(text)
    if not m:
        raise SpecError("not a size", where=where, value=value, allowed=SIZE_HELP)
    number, prefix, binary, byte = m.groups()
    prefix = prefix.lower()
    if binary and not prefix:
        raise SpecError("not a size", where=where, value=value, allowed=SIZE_HELP)
    # "GB" with an explicit B and no i is decimal; "G" and "GiB" are binary.
    base = 1000 if (byte and not binary and prefix) else 1024
    result = float(number) * base ** _POWERS[prefix]
    if result != int(result) or result < 0:
        raise SpecError("size must be a whole number of bytes", where=where, value=value)
    if result > 2**63:
        raise SpecError("size is too large", where=where, value=value)
    return int(result)


def parse_duration(value: object, *, where: str = "") -> float:
    """Return a duration in seconds from Go-style text (``1h30m``) or a number."""
    if isinstance(value, bool):
        raise SpecError("expected a duration", where=where, value=value, allowed=DURATION_HELP)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            pos, seconds = 0, 0.0
            for m in _DUR_RE.finditer(text):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _DUR_SCALE[m.group(2)]
                pos = m.end()
            if pos != len(text) or not text:
                raise SpecError("not a duration", where=where, value=value, allowed=DURATION_HELP)
    else:
        raise SpecError("expected a duration", where=where, value=value, allowed=DURATION_HELP)
    if not 0 <= seconds <= 365 * 86400:
        raise SpecError("duration out of range", where=where, value=value, allowed="0s to 8760h")
    return seconds


def parse_port(value: object, *, where: str = "", allow_zero: bool = False) -> int:
    """Return a TCP/UDP port number (1-65535, or 0 when ``allow_zero``)."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SpecError("expected a port number", where=where, value=value, allowed=f"{low}-65535")
    try:
        port = int(value)
    except ValueError:
        raise SpecError(
            "not a port number", where=where, value=value, allowed=f"{low}-65535"
        ) from None
    if not low <= port <= 65535:
        raise SpecError("port out of range", where=where, value=value, allowed=f"{low}-65535")
    return port


def check_hostname(value: object, *, where: str = "") -> str:
    """Return ``value`` if it is an RFC 1123 host name (labels of a-z, 0-9, '-')."""
    allowed = "RFC 1123 host name: dot-separated labels of letters, digits and '-', <= 253 chars"
    if not isinstance(value, str) or not value or len(value) > 253:
        raise SpecError("not a host name", where=where, value=value, allowed=allowed)
    if not all(_HOST_LABEL.match(label) for label in value.rstrip(".").split(".")):
        raise SpecError("not a host name", where=where, value=value, allowed=allowed)
    return value


MIB = 1024 * 1024
