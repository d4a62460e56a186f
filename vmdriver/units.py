"""Parsing of the scalar units jobs and configs use: sizes, durations, ports, names.

Each parser raises :class:`~vmdriver.errors.SpecError` naming what it expected,
so a caller only adds *where* the value came from. Parsers accept ASCII digits
only (Python's ``int()`` and ``\\d`` would also take full-width digits or ``"8_0"``) and
do exact arithmetic, so no input can overflow into a traceback.
"""

from __future__ import annotations

import math
import os
import re
from fractions import Fraction
from pathlib import Path

from vmdriver.errors import SpecError

# re.ASCII: \d must not match other scripts' digits, nor IGNORECASE fold "K" (Kelvin) into k.
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?)(b?)\s*$", re.IGNORECASE | re.ASCII)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_NUMBER_RE = re.compile(r"^\s*\d+(\.\d+)?\s*$", re.ASCII)
_INT_RE = re.compile(r"^\s*\d{1,20}\s*$", re.ASCII)

SIZE_HELP = "a byte count or a size like 512MiB, 10GiB, 20GB"
DURATION_HELP = "a duration like 500ms, 30s, 5m, 1h30m, or a number of seconds"
#: The longest duration any field takes (a year), so no arithmetic overflows.
MAX_DURATION_S = 365 * 86400
MAX_SIZE = 2**63

_DUR_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", re.ASCII)
_DUR_SCALE = {
    "ns": Fraction(1, 10**9), "us": Fraction(1, 10**6), "µs": Fraction(1, 10**6),
    "ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60), "h": Fraction(3600),
}

_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$", re.IGNORECASE | re.ASCII)

MIB = 1024 * 1024
#: Nomad's qemu driver refuses less guest memory than this (MiB).
MIN_MEMORY_MIB = 128
#: vCPUs QEMU accepts for any machine type we render.
MAX_CORES = 1024
#: sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107


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
        text = f"{value.strip()}{default_unit}" if _NUMBER_RE.match(value) else value
    else:
        raise SpecError("expected a size", where=where, value=value, allowed=SIZE_HELP)
    m = _SIZE_RE.match(text)
    if not m:
        raise SpecError("not a size", where=where, value=value, allowed=SIZE_HELP)
    number, prefix, binary, byte = m.groups()
    prefix = prefix.lower()
    if binary and not prefix:
        raise SpecError("not a size", where=where, value=value, allowed=SIZE_HELP)
    if len(number) > 40:
        raise SpecError("size is too large", where=where, value=value, allowed=f"<= {MAX_SIZE}")
    # "GB" with an explicit B and no i is decimal; "G" and "GiB" are binary.
    base = 1000 if (byte and not binary and prefix) else 1024
    result = Fraction(number) * base ** _POWERS[prefix]
    if result.denominator != 1:
        raise SpecError("size must be a whole number of bytes", where=where, value=value)
    if result > MAX_SIZE:
        raise SpecError("size is too large", where=where, value=value, allowed=f"<= {MAX_SIZE}")
    return int(result)


def parse_duration(value: object, *, where: str = "") -> float:
    """Return a duration in seconds from Go-style text (``1h30m``) or a number."""
    if isinstance(value, bool):
        raise SpecError("expected a duration", where=where, value=value, allowed=DURATION_HELP)
    if isinstance(value, int):
        seconds = Fraction(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise SpecError("not a duration", where=where, value=value, allowed=DURATION_HELP)
        seconds = Fraction(value)
    elif isinstance(value, str):
        seconds = _duration_text(value, where)
    else:
        raise SpecError("expected a duration", where=where, value=value, allowed=DURATION_HELP)
    if not 0 <= seconds <= MAX_DURATION_S:
        raise SpecError("duration out of range", where=where, value=value, allowed="0s to 8760h")
    return float(seconds)


def _duration_text(value: str, where: str) -> Fraction:
    """Seconds of a plain number or a Go duration (``1h30m``) given as text."""
    text = value.strip()
    if len(text) > 64:
        raise SpecError("not a duration", where=where, value=value, allowed=DURATION_HELP)
    if _NUMBER_RE.match(text):
        return Fraction(text)
    pos, seconds = 0, Fraction(0)
    for m in _DUR_RE.finditer(text):
        if m.start() != pos:
            break
        seconds += Fraction(m.group(1)) * _DUR_SCALE[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise SpecError("not a duration", where=where, value=value, allowed=DURATION_HELP)
    return seconds


def parse_port(value: object, *, where: str = "", allow_zero: bool = False) -> int:
    """Return a TCP/UDP port number (1-65535, or 0 when ``allow_zero``)."""
    low = 0 if allow_zero else 1
    allowed = f"a whole number from {low} to 65535"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SpecError("expected a port number", where=where, value=value, allowed=allowed)
    if isinstance(value, str):
        if not _INT_RE.match(value):
            raise SpecError("not a port number", where=where, value=value, allowed=allowed)
        value = int(value)
    if not low <= value <= 65535:
        raise SpecError("port out of range", where=where, value=value, allowed=allowed)
    return value


def check_hostname(value: object, *, where: str = "") -> str:
    """Return ``value`` if it is an RFC 1123 host name (labels of a-z, 0-9, '-')."""
    allowed = "RFC 1123 host name: dot-separated labels of letters, digits and '-', <= 253 chars"
    if not isinstance(value, str) or not value or len(value) > 253:
        raise SpecError("not a host name", where=where, value=value, allowed=allowed)
    if not all(_HOST_LABEL.match(label) for label in value.removesuffix(".").split(".")):
        raise SpecError("not a host name", where=where, value=value, allowed=allowed)
    return value


def parse_memory_mib(value: object, *, where: str = "", host_mib: int | None = None,
                     minimum: int = MIN_MEMORY_MIB) -> int:
    """Guest memory in MiB from a whole number of MiB or a size (``2GiB``).

    Bounded below by ``minimum`` (Nomad's 128 MiB) and above by the host's memory.
    """
    top = host_mib if host_mib else MAX_SIZE // MIB
    allowed = f"{minimum} to {top} MiB, as a number of MiB or a size like 2GiB"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SpecError("expected an amount of memory", where=where, value=value, allowed=allowed)
    try:
        size = parse_size(value, where=where, default_unit="MiB")
    except SpecError:
        raise SpecError("not an amount of memory", where=where, value=value,
                        allowed=allowed) from None
    if size % MIB:
        raise SpecError("memory must be a whole number of MiB", where=where, value=value,
                        allowed=allowed)
    mib = size // MIB
    if not minimum <= mib <= top:
        raise SpecError("memory out of bounds", where=where, value=value, allowed=allowed)
    return mib


def check_cores(value: object, *, where: str = "", maximum: int = MAX_CORES) -> int:
    """A vCPU count: a whole number from 1 to ``maximum``."""
    allowed = f"a whole number from 1 to {maximum}"
    if isinstance(value, str) and _INT_RE.match(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError("expected a number of cores", where=where, value=value, allowed=allowed)
    if not 1 <= value <= maximum:
        raise SpecError("cores out of bounds", where=where, value=value, allowed=allowed)
    return value


#: Longest job, group, task, volume or snapshot name (bytes of UTF-8).
MAX_NAME_BYTES = 128
NAME_HELP = (f"1 to {MAX_NAME_BYTES} bytes without '/', '\\', NUL or control characters, "
             "and not '.' or '..'")


def check_name(value: object, *, where: str = "", what: str = "name") -> str:
    """``value`` if it is safe as one path component, as Nomad requires of its names.

    Job, group, task, alloc, volume and snapshot names become directory and file
    names (task dirs, cgroups, volumes); Nomad refuses a ``/`` and a NUL in them,
    and so does every face here, before any of them reaches a path.
    """
    if not isinstance(value, str):
        raise SpecError(f"{what} must be a string", where=where, value=value, allowed=NAME_HELP)
    bad = next((c for c in value if c in "/\\" or ord(c) < 32 or 0x7F <= ord(c) < 0xA0), None)
    if bad is not None or value in ("", ".", "..") or len(value.encode("utf-8", "replace")) \
            > MAX_NAME_BYTES or value != value.strip():
        raise SpecError(f"{what} is not a valid name", where=where, value=value, allowed=NAME_HELP)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (msgpack or JSON can carry one)
        raise SpecError(f"{what} is not valid UTF-8", where=where, value=value,
                        allowed=NAME_HELP) from None
    return value


def check_socket_path(path: Path | str, *, where: str = "") -> Path:
    """``path`` if it fits a unix socket address (107 bytes on Linux)."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise SpecError(f"socket path is {size} bytes, longer than a unix socket allows",
                        where=where or str(path), value=str(path),
                        allowed=f"at most {MAX_SOCKET_PATH} bytes; use a shorter "
                        "state dir or task name")
    return Path(path)
