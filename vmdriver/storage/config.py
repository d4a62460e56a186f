"""The operator's ``storage_pools`` block: where task volumes live.

The virt driver's syntax, as python-hcl2 gives it (every block a list of bodies,
labelled blocks a list of ``{label: body}``)::

    storage_pools {
      default = "local"
      directory "local" { path = "/var/lib/virt/storage" }
      ceph "remote" {
        pool  = "nomad-pool"
        hosts = ["10.0.0.2:3300"]
        authentication { username = "nomad", secret = "AQC...==" }
      }
    }

Nomad's SetConfig gives labelled blocks as a ``{label: body}`` map instead; both
shapes are accepted. With a single pool it is the default. Ceph pools are
validated here; whether a backend exists for them is decided when a pool is
opened (:func:`vmdriver.storage.pools.open_pool`).
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from vmdriver.errors import HostConfigError

#: Pool names: a label an operator types and a job's ``pool`` names.
POOL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", re.ASCII)
POOL_NAME_HELP = "1-63 letters, digits, '_', '.', '-', starting with a letter or digit"
#: A Ceph monitor: ``host:port``, ``[v6]:port``, or a bare host (default port).
_MON_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252})(:\d{1,5})?$",
                     re.ASCII)
_CEPH_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$", re.ASCII)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DirectoryPoolConfig(_Frozen):
    """A directory on this host holding one file per volume."""

    kind: Literal["directory"] = "directory"
    name: str
    #: Absolute host path; created (0700) when the pool is first opened.
    path: Path

    @field_validator("path", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Path:
        if not isinstance(value, str | Path) or not str(value).strip() or "\x00" in str(value):
            raise ValueError("expected an absolute directory path")
        if not Path(value).is_absolute():
            raise ValueError(f"not an absolute path: {str(value)!r}")
        return Path(value)


class CephAuth(_Frozen):
    """Cephx credentials: the client name and its key (never shown in errors or repr)."""

    username: str
    secret: SecretStr

    @field_validator("username")
    @classmethod
    def _username(cls, value: str) -> str:
        if not _CEPH_NAME_RE.match(value):
            raise ValueError("expected a Ceph client name like nomad (without 'client.')")
        return value

    @field_validator("secret", mode="before")
    @classmethod
    def _secret(cls, value: Any) -> Any:
        # Never echo the value: the message names the field only.
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(text, str) or not text:
            raise ValueError("expected the client's base64 key")
        try:
            base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not a base64 Ceph key") from None
        return text


class CephPoolConfig(_Frozen):
    """An RBD pool in a Ceph cluster (backend: :mod:`vmdriver.storage.rbd`)."""

    kind: Literal["ceph"] = "ceph"
    name: str
    #: The Ceph pool's name in the cluster.
    pool: str
    #: Monitor addresses, ``host:port``.
    hosts: tuple[str, ...]
    authentication: CephAuth

    @field_validator("pool")
    @classmethod
    def _pool(cls, value: str) -> str:
        if not _CEPH_NAME_RE.match(value):
            raise ValueError("expected a Ceph pool name (letters, digits, '_', '.', '-')")
        return value

    @field_validator("hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
            raise ValueError("expected a non-empty list of monitor addresses like 10.0.0.2:3300")
        for i, host in enumerate(value):
            if not isinstance(host, str) or not _MON_RE.match(host):
                raise ValueError(f"item {i} is not a monitor address: {host!r} (expected "
                                 "host:port)")
            port = host.rsplit(":", 1)[1] if re.search(r":\d+$", host) else "3300"
            if not 1 <= int(port) <= 65535:
                raise ValueError(f"item {i} has a port out of range: {host!r}")
        return tuple(value)

    @field_validator("authentication", mode="before")
    @classmethod
    def _one_block(cls, value: Any) -> Any:
        return _single(value)


PoolConfig = Annotated[DirectoryPoolConfig | CephPoolConfig, Field(discriminator="kind")]


class StoragePools(_Frozen):
    """Every configured pool and the default one."""

    default: str
    pools: tuple[PoolConfig, ...]

    @model_validator(mode="before")
    @classmethod
    def _from_hcl(cls, data: Any) -> Any:
        """Accept the virt driver's block shape as well as ``{default, pools}``."""
        return _normalize(data)

    @model_validator(mode="after")
    def _names(self) -> StoragePools:
        if not self.pools:
            raise ValueError("no storage pools defined")
        seen: set[str] = set()
        for pool in self.pools:
            if not POOL_NAME_RE.match(pool.name):
                raise ValueError(f"{pool.kind}.{pool.name}: pool name not allowed "
                                 f"(expected {POOL_NAME_HELP})")
            if pool.name in seen:
                raise ValueError(f"{pool.kind}.{pool.name}: storage pool name already defined")
            seen.add(pool.name)
        if self.default not in seen:
            raise ValueError(f"default: unknown storage pool {self.default!r} (defined: "
                             f"{', '.join(sorted(seen))})")
        return self

    def get(self, name: str | None) -> PoolConfig:
        """The pool called ``name``, or the default pool for ``None``."""
        wanted = self.default if name is None else name
        for pool in self.pools:
            if pool.name == wanted:
                return pool
        raise KeyError(wanted)

    @property
    def names(self) -> tuple[str, ...]:
        """Pool names in config order."""
        return tuple(p.name for p in self.pools)


def _normalize(data: Any) -> Any:
    """``{default, pools}`` from the HCL block shape (other shapes: left to pydantic)."""
    data = _single(data)
    if not isinstance(data, dict) or "pools" in data:
        return data
    unknown = set(data) - {"default", "directory", "ceph"}
    if unknown:
        # Reported by pydantic as extra fields, with their names.
        return {**{k: data[k] for k in unknown}, "default": "", "pools": ()}
    pools: list[dict[str, Any]] = []
    for kind in ("directory", "ceph"):
        for label, body in _labelled(data.get(kind), kind):
            pools.append({**body, "name": label, "kind": kind})
    if not pools:
        raise ValueError("no storage pools defined (add a directory \"NAME\" { path } block)")
    out: dict[str, Any] = {"pools": pools}
    if "default" in data:
        out["default"] = data["default"]
    elif len(pools) == 1:
        out["default"] = pools[0]["name"]
    elif pools:
        raise ValueError("default: required when more than one pool is defined")
    return out


def _single(value: Any) -> Any:
    """A block body: python-hcl2 wraps every block in a list."""
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    if isinstance(value, list):
        raise ValueError("block may appear only once")  # noqa: TRY004 (pydantic wants ValueError)
    return value


def _labelled(value: Any, kind: str) -> list[tuple[str, dict[str, Any]]]:
    """``(label, body)`` pairs from ``[{label: body}, ...]`` or ``{label: body}``."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError(  # noqa: TRY004 (pydantic wants ValueError)
                f"{kind}: expected labelled blocks like {kind} \"NAME\" {{ ... }}")
        for label, raw_body in item.items():
            body = _single(raw_body)
            if not isinstance(body, dict):
                raise ValueError(f"{kind}.{label}: expected a block")  # noqa: TRY004
            out.append((str(label), body))
    return out


def default_storage_pools(state_dir: Path) -> StoragePools:
    """What a host without ``storage_pools`` gets: one directory pool under the state dir."""
    return StoragePools(default="default", pools=(
        DirectoryPoolConfig(name="default", path=state_dir / "storage"),))


def parse_storage_pools(raw: object, where: str) -> StoragePools:
    """Validate a ``storage_pools`` block; errors name the field, never the Ceph secret."""
    try:
        return _validate(raw)
    except _Invalid as exc:
        where_field = f"{where}: storage_pools" + (f".{exc.field}" if exc.field else "")
        raise HostConfigError(exc.msg, where=where_field) from None


def validate_storage_pools(raw: object) -> StoragePools:
    """For a pydantic ``field_validator(mode="before")`` of a model embedding the pools.

    Raises ``ValueError("directory.local.path: not an absolute path: 'x'")``, which
    the embedding model's error rendering shows after ``storage_pools``.
    """
    try:
        return _validate(raw)
    except _Invalid as exc:
        raise ValueError(f"{exc.field}: {exc.msg}" if exc.field else exc.msg) from None


class _Invalid(Exception):
    def __init__(self, field: str, msg: str) -> None:
        super().__init__(msg)
        self.field, self.msg = field, msg


def _validate(raw: object) -> StoragePools:
    try:
        return StoragePools.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors(include_input=False)[0]
        field = _field_path(err["loc"], raw)
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
        head, sep, rest = msg.partition(": ")
        if sep and re.fullmatch(r"\S+", head) and not field:
            field, msg = head, rest
        raise _Invalid(field, msg[:1].lower() + msg[1:]) from None
    except ValueError as exc:
        raise _Invalid("", str(exc)) from None


def _field_path(loc: tuple[int | str, ...], raw: object) -> str:
    """``directory.local.path`` from pydantic's ``('pools', 0, 'directory', 'path')``."""
    parts = [str(p) for p in loc]
    if len(parts) >= 3 and parts[0] == "pools" and parts[1].isdigit():
        try:
            pools = _normalize(raw)["pools"]
            pool = pools[int(parts[1])]
            return ".".join([pool["kind"], pool["name"], *parts[3:]])
        except (ValueError, KeyError, IndexError, TypeError):
            pass
    return ".".join(parts)
