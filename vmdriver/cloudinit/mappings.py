"""Seed files from ready-made mappings: the runner's ``cloudInit.{metaData,userData,networkConfig}``.

VM-Operator's runner writes the three mappings as YAML, gives ``user-data`` a
``#cloud-config`` header and fills in an ``instance-id`` when ``metaData`` has
none. The same here, through the same safe YAML writer as the virt seed; the
result goes to :func:`~vmdriver.cloudinit.seed.iso_image` or
:func:`~vmdriver.cloudinit.seed.fat_image` (the runner's convention is FAT).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmdriver.cloudinit.request import HOSTNAME_LABEL, INSTANCE_ID
from vmdriver.cloudinit.userdata import YAML_HEADER, dump_yaml
from vmdriver.errors import SpecError


def mapping_seed_files(*, instance_id: str, meta_data: Mapping[str, Any] | None = None,
                       user_data: Mapping[str, Any] | None = None,
                       network_config: Mapping[str, Any] | None = None,
                       hostname: str | None = None, where: str = "cloudInit") -> dict[str, bytes]:
    """``meta-data``, ``user-data`` and (if given) ``network-config`` as bytes.

    :param instance_id: used when ``meta_data`` has no ``instance-id`` (e.g. ``v<generation>``).
    :param hostname: used when ``meta_data`` has no ``local-hostname``.
    :raise SpecError: an instance-id or host name cloud-init would choke on.
    """
    meta = dict(meta_data or {})
    meta.setdefault("instance-id", instance_id)
    if hostname is not None:
        meta.setdefault("local-hostname", hostname)
    if not isinstance(meta["instance-id"], str) or not INSTANCE_ID.fullmatch(meta["instance-id"]):
        raise SpecError("instance-id: 1-128 of letters, digits, '.', '_', ':', '-'",
                        where=f"{where}.metaData", value=meta["instance-id"])
    host = meta.get("local-hostname")
    if host is not None and (not isinstance(host, str) or not HOSTNAME_LABEL.fullmatch(host)):
        raise SpecError("local-hostname is not an RFC 1123 label", where=f"{where}.metaData", value=host)
    files = {
        "meta-data": dump_yaml(meta).encode(),
        "user-data": (YAML_HEADER + (dump_yaml(dict(user_data)) if user_data else "")).encode(),
    }
    if network_config is not None:
        files["network-config"] = dump_yaml(dict(network_config)).encode()
    return files
