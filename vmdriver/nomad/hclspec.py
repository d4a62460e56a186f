"""The hclspec schemas the plugin declares: host config (ConfigSchema) and task config.

Nomad decodes the agent's ``plugin { config {} }`` block and each task's
``config {}`` block against these specs, then sends the result as msgpack. The
specs only shape the HCL; every value is validated again by the same pydantic
models `vmdriver run` uses, so both faces accept and refuse the same things.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vmdriver.host.config import HostConfig
from vmdriver.jobfile.dialects import Dialect
from vmdriver.nomad.proto import hclspec_pb2 as hs

#: Task config keys whose HCL type is not the one their Python type implies:
#: ``port_map { http = 80 }`` arrives as a list of maps (a block), as in Nomad's
#: qemu driver.
TASK_TYPE_OVERRIDES = {"port_map": "list(map(number))"}


def hcl_type(annotation: Any) -> str:
    """The HCL type expression for a (pydantic field) Python type."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        return hcl_type(args[0]) if len(args) == 1 else "any"
    if origin in (tuple, list, set, frozenset):
        return f"list({hcl_type(args[0]) if args else 'any'})"
    if origin is dict:
        return f"map({hcl_type(args[1]) if len(args) == 2 else 'any'})"
    if origin is typing.Literal:
        return "string"
    if annotation is bool:
        return "bool"
    if isinstance(annotation, type) and issubclass(annotation, int | float):
        return "number"
    if annotation is str or annotation is Path or isinstance(annotation, type):
        return "string"
    return "any"


def object_spec(model: type[BaseModel], overrides: dict[str, str] | None = None) -> hs.Spec:
    """An ``Object`` spec with one optional attribute per model field."""
    overrides = overrides or {}
    attrs = {}
    for name, info in model.model_fields.items():
        kind = overrides.get(name) or hcl_type(info.annotation)
        attrs[name] = hs.Spec(Attr=hs.Attr(name=name, type=kind, required=False))
    return hs.Spec(object=hs.Object(attributes=attrs))


def host_config_spec() -> hs.Spec:
    """ConfigSchema: the body of ``plugin "vmdriver" { config { ... } }``."""
    return object_spec(HostConfig)


def task_config_spec(dialect: Dialect) -> hs.Spec:
    """TaskConfigSchema: a qemu task's ``config { ... }``."""
    return object_spec(dialect.model, TASK_TYPE_OVERRIDES)
