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


def _attrs(**types: str) -> hs.Spec:
    """An object of optional attributes, ``name=hcl type``."""
    return hs.Spec(object=hs.Object(attributes={
        name: hs.Spec(Attr=hs.Attr(name=name, type=kind, required=False))
        for name, kind in types.items()}))


def _with(obj: hs.Spec, **nested: hs.Spec) -> hs.Spec:
    """``obj`` plus nested block specs."""
    for name, spec in nested.items():
        obj.object.attributes[name].CopyFrom(spec)
    return obj


def _block(name: str, nested: hs.Spec) -> hs.Spec:
    return hs.Spec(block_value=hs.Block(name=name, required=False, nested=nested))


def _block_list(name: str, nested: hs.Spec) -> hs.Spec:
    return hs.Spec(block_list=hs.BlockList(name=name, nested=nested))


def _block_map(name: str, nested: hs.Spec) -> hs.Spec:
    return hs.Spec(block_map=hs.BlockMap(name=name, labels=["name"], nested=nested))


def host_config_spec() -> hs.Spec:
    """ConfigSchema: the body of ``plugin "vmdriver" { config { ... } }``.

    The sections nomad-driver-virt's agents write as blocks (``storage_pools {}``,
    ``provider "libvirt" {}``) and the managed ``network "x" {}`` blocks are block
    specs, so the agent's HCL decodes as it did for the virt driver.
    """
    spec = object_spec(HostConfig)
    ceph = _with(_attrs(pool="string", hosts="list(string)"),
                 authentication=_block("authentication", _attrs(username="string", secret="string")))
    pools = _with(_attrs(default="string"),
                  directory=_block_map("directory", _attrs(path="string")),
                  ceph=_block_map("ceph", ceph))
    network = _attrs(bridge="string", subnet="string", dhcp="bool", nat="bool",
                     ipv6_subnet="string", dns="bool", domain="string")
    return _with(spec, storage_pools=_block("storage_pools", pools),
                 provider=_block_map("provider", _attrs(uri="string", user="string",
                                                        password="string")),
                 network=_block_map("network", network))


def virt_task_spec(model: type[BaseModel]) -> hs.Spec:
    """nomad-driver-virt's task schema: ``disk`` and ``network_interface`` blocks, ``os {}``.

    Every other field of ``model`` is an attribute of the type its annotation implies.
    """
    source = _attrs(image="string", volume="string", format="string")
    disk = _with(_attrs(size="string", sparse="bool", format="string", bus_type="string",
                        devname="string", kind="string", read_only="bool", pool="string",
                        primary="bool", chained="bool", driver="string", volume="string",
                        source="any"),
                 source=_block("source", source))
    iface = _with(_attrs(bridge="any", macvtap="any"),
                  bridge=_block("bridge", _attrs(name="string", ports="list(string)")),
                  macvtap=_block("macvtap", _attrs(device="string", mode="string")))
    return _with(object_spec(model), disk=_block_list("disk", disk),
                 os=_block("os", _attrs(arch="string", machine="string")),
                 network_interface=_block_list("network_interface", iface))


def task_config_spec(dialect: Dialect) -> hs.Spec:
    """TaskConfigSchema: the ``config { ... }`` of the dialect's tasks."""
    if dialect.name == "virt":
        return virt_task_spec(dialect.model)
    return object_spec(dialect.model, TASK_TYPE_OVERRIDES)


def without_nulls(value: Any) -> Any:
    """A decoded config without nil attributes at any depth (hcldec sends every unset one)."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value
