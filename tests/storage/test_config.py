"""storage_pools in the host config: the virt driver's HCL as python-hcl2 gives it."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmdriver.errors import HostConfigError
from vmdriver.hclfile import loads
from vmdriver.storage import (
    CephPoolConfig,
    DirectoryPoolConfig,
    Pools,
    StoragePools,
    StorageUnavailable,
    default_storage_pools,
    parse_storage_pools,
)
from vmdriver.storage.config import validate_storage_pools
from vmdriver.storage.pools import BACKENDS

SECRET = "AQCzNMxpb6aWIxAA7YrNMSg8z5TxEvB0jsuibQ=="

# The full example of nomad-driver-virt's README (seed 003), storage part.
README_FULL = f"""
storage_pools {{
  default = "local"
  directory "local" {{
    path = "/var/lib/virt/storage"
  }}
  ceph "remote-storage" {{
    pool = "nomad-pool"
    hosts = [
      "10.0.0.2:3300",
      "10.0.0.12:3300",
      "10.0.0.99:3300",
    ]
    authentication {{
      username = "nomad"
      secret = "{SECRET}"
    }}
  }}
}}
"""


def parse(text: str) -> StoragePools:
    return parse_storage_pools(loads(text, "host.hcl")["storage_pools"], "host.hcl")


def error(text: str) -> str:
    with pytest.raises(HostConfigError) as info:
        parse(text)
    return str(info.value)


def test_readme_full_example() -> None:
    pools = parse(README_FULL)
    assert pools.default == "local"
    local, remote = pools.pools
    assert local == DirectoryPoolConfig(name="local", path=Path("/var/lib/virt/storage"))
    assert isinstance(remote, CephPoolConfig)
    assert remote.pool == "nomad-pool"
    assert remote.hosts == ("10.0.0.2:3300", "10.0.0.12:3300", "10.0.0.99:3300")
    assert remote.authentication.username == "nomad"
    assert remote.authentication.secret.get_secret_value() == SECRET
    assert SECRET not in repr(pools) and SECRET not in str(pools)


def test_single_pool_is_the_default() -> None:
    pools = parse('storage_pools { directory "only" { path = "/srv/vols" } }')
    assert pools.default == "only"
    assert pools.get(None).name == "only"


def test_nomad_setconfig_shape_is_accepted() -> None:
    # Nomad's hclspec block_map arrives as {label: body}, not [{label: body}].
    pools = parse_storage_pools({"directory": {"a": {"path": "/a"}}}, "plugin config")
    assert pools.get(None) == DirectoryPoolConfig(name="a", path=Path("/a"))


@pytest.mark.parametrize(("text", "expected"), [
    ('storage_pools { directory "a" { path = "rel" } }',
     "host.hcl: storage_pools.directory.a.path: not an absolute path: 'rel'"),
    ('storage_pools { directory "a" { } }',
     "host.hcl: storage_pools.directory.a.path: required field is missing"),
    ('storage_pools {\n directory "a" {\n path = "/a"\n size = 1\n }\n}',
     "host.hcl: storage_pools.directory.a.size: unknown field"),
    ('storage_pools {\n directory "a" { path = "/a" }\n directory "b" { path = "/b" }\n}',
     "host.hcl: storage_pools.default: required when more than one pool is defined"),
    ('storage_pools {\n default = "c"\n directory "a" { path = "/a" }\n}',
     "host.hcl: storage_pools.default: unknown storage pool 'c' (defined: a)"),
    ('storage_pools { }', "host.hcl: storage_pools: no storage pools defined"),
    ('storage_pools { zfs = 1 }', "host.hcl: storage_pools.zfs: unknown field"),
    ('storage_pools { directory "../up" { path = "/a" } }',
     "host.hcl: storage_pools.directory.../up: pool name not allowed"),
    ('storage_pools {\n default = "a"\n directory "a" { path = "/a" }\n'
     ' ceph "a" {\n pool = "p"\n hosts = ["h:1"]\n'
     f' authentication {{\n username = "u"\n secret = "{SECRET}"\n }}\n }}\n}}',
     "host.hcl: storage_pools.ceph.a: storage pool name already defined"),
    ('storage_pools { ceph "r" {\n pool = "p"\n hosts = ["h:99999"]\n'
     f' authentication {{\n username = "u"\n secret = "{SECRET}"\n }}\n }}\n}}',
     "host.hcl: storage_pools.ceph.r.hosts: item 0 has a port out of range"),
    ('storage_pools { ceph "r" {\n pool = "p"\n hosts = ["h:1"]\n }\n}',
     "host.hcl: storage_pools.ceph.r.authentication: required field is missing"),
])
def test_errors_name_the_field(text: str, expected: str) -> None:
    assert error(text).startswith(expected)


def test_bad_secret_is_never_echoed() -> None:
    bad = "not!base64" + SECRET
    msg = error('storage_pools { ceph "r" {\n pool = "p"\n hosts = ["h:1"]\n'
                f' authentication {{\n username = "u"\n secret = "{bad}"\n }}\n }}\n}}')
    assert msg == "host.hcl: storage_pools.ceph.r.authentication.secret: not a base64 Ceph key"
    assert bad not in msg


def test_pool_kind_without_backend_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # As before the Ceph backend existed: its module cannot be imported.
    monkeypatch.setitem(BACKENDS, "ceph", "vmdriver.storage.no_such_backend:RbdPool")
    pools = Pools(parse(README_FULL))
    with pytest.raises(StorageUnavailable) as info:
        pools.get("remote-storage")
    assert str(info.value) == ("storage pool 'remote-storage' is a ceph pool; this version of "
                               "vmdriver has no ceph backend yet")
    pools.close()


def test_default_pools_live_under_the_state_dir(tmp_path: Path) -> None:
    pools = default_storage_pools(tmp_path)
    assert pools.get(None) == DirectoryPoolConfig(name="default", path=tmp_path / "storage")


def test_embedding_in_a_pydantic_model_keeps_field_names() -> None:
    from pydantic import BaseModel, ValidationError, field_validator

    class Host(BaseModel):
        storage_pools: StoragePools | None = None

        @field_validator("storage_pools", mode="before")
        @classmethod
        def _pools(cls, value: object) -> StoragePools | None:
            return None if value is None else validate_storage_pools(value)

    raw = loads('storage_pools { directory "a" { path = "/a" } }', "h")
    assert Host.model_validate(raw).storage_pools == parse(
        'storage_pools { directory "a" { path = "/a" } }')
    with pytest.raises(ValidationError) as exc:
        Host.model_validate(loads('storage_pools { directory "a" { path = "rel" } }', "h"))
    assert exc.value.errors()[0]["msg"] == ("Value error, directory.a.path: not an absolute "
                                            "path: 'rel'")
