"""Decoding the msgpack Nomad sends for config blocks (go-cty's encoding).

go-cty writes an object as a map holding *every* attribute of the spec, with nil
for the ones the user left out; integers as msgpack ints; and a number that is
not exactly a float64 (``0.1`` as HCL parses it) as a decimal string. Nomad's
HCL-to-msgpack path turns a block into a list of objects.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

import msgpack

from vmdriver.errors import InputError


def decode_config(data: bytes, *, where: str, numbers: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The config object as a dict without the nil (unset) attributes.

    ``numbers`` names attributes of HCL type ``number``: a decimal string there
    becomes an int or float, as the user wrote it.
    """
    if not data:
        return {}
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise InputError(f"config is not valid msgpack: {exc}", where=where) from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError("config is not an object", where=where, value=type(value).__name__)
    out: dict[str, Any] = {}
    for key, item in value.items():
        if item is None:
            continue
        _reject_ext(item, f"{where}.{key}")
        out[str(key)] = _number(item, f"{where}.{key}") if key in numbers else item
    return out


def _reject_ext(value: Any, where: str) -> None:
    if isinstance(value, msgpack.ExtType):
        raise InputError("config value is not known yet (unknown cty value)", where=where)
    if isinstance(value, list):
        for i, item in enumerate(value):
            _reject_ext(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _reject_ext(item, f"{where}.{key}")


def _number(value: Any, where: str) -> Any:
    """An int for integral decimal strings, a float for others; anything else unchanged."""
    if not isinstance(value, str):
        return value
    try:
        dec = Decimal(value)
    except InvalidOperation:
        raise InputError("not a number", where=where, value=value) from None
    return int(dec) if dec == dec.to_integral_value() else float(dec)
