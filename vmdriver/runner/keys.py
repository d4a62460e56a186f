"""Strict key checking for the runner's YAML config, before pydantic sees the values.

VM-Operator ignores unknown keys (Jackson with ``FAIL_ON_UNKNOWN_PROPERTIES`` off), so a
typo silently falls back to a default. Here every key is checked against the model it
lands in: an unknown key is one error line naming it and the closest valid key, and the
spellings VM-Operator's own sample file uses (which its Java code never read) are
accepted with a warning and renamed.
"""

from __future__ import annotations

import difflib
import logging
import types
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from vmdriver.errors import SpecError

log = logging.getLogger(__name__)

#: Spellings from VM-Operator's config-sample.yaml and its manager's config template,
#: per model: old key -> the key the Java runner actually reads.
LEGACY_KEYS: dict[str, dict[str, str]] = {
    "Vm": {"cpuSockets": "sockets", "coresPerSocket": "coresPerDie", "accelertor": "accelerator"},
    "Spice": {"streaming-video": "streamingVideo"},
}

#: Keys older VM-Operator configs had elsewhere: an error that says where they went.
MOVED_KEYS: dict[str, dict[str, str]] = {
    "Vm": {"spice": "vm.display.spice"},
}


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model class inside ``M``, ``M | None`` or ``tuple[M, ...]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, tuple, list):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _keys(model: type[BaseModel]) -> dict[str, Any]:
    """Valid YAML key -> annotation of the field it fills."""
    return {(f.alias or name): f.annotation for name, f in model.model_fields.items()}


def unknown_key(key: str, valid: list[str], where: str) -> SpecError:
    """The error for a key no model has, suggesting the nearest valid one."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return SpecError(f"unknown key {key!r}; did you mean {close[0]!r}?", where=where)
    return SpecError(f"unknown key {key!r}", where=where, allowed=sorted(valid))


def check_keys(data: Any, model: type[BaseModel], path: str, file: str) -> Any:
    """Return ``data`` with legacy keys renamed; raise on the first unknown key.

    ``path`` is the dotted place of ``data`` in the file (for messages), ``file`` the
    config file's name. Values that are not mappings are left to pydantic.
    """
    if not isinstance(data, Mapping):
        return data
    fields = _keys(model)
    legacy = LEGACY_KEYS.get(model.__name__, {})
    out: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{file}: {path}.{key}" if path else f"{file}: {key}"
        name = key
        if not isinstance(key, str):
            raise SpecError("keys must be strings", where=where, value=key)
        if key in legacy:
            name = legacy[key]
            if name in data:
                raise SpecError(f"both {key!r} and {name!r} are given; keep {name!r}", where=where)
            log.warning("%s: %r is the spelling of VM-Operator's sample config; read as %r",
                        where, key, name)
        elif key in MOVED_KEYS.get(model.__name__, {}):
            raise SpecError(f"{key!r} moved: write it as {MOVED_KEYS[model.__name__][key]}",
                            where=where)
        elif key not in fields:
            raise unknown_key(key, list(fields), where)
        out[name] = _check_value(value, fields[name], f"{path}.{name}" if path else name, file)
    return out


def _check_value(value: Any, annotation: Any, path: str, file: str) -> Any:
    sub = _model_of(annotation)
    if sub is None:
        return value
    if isinstance(value, list):
        return [check_keys(item, sub, f"{path}[{i}]", file) for i, item in enumerate(value)]
    return check_keys(value, sub, path, file)
