"""Small builders shared by the cloud-init tests."""

from __future__ import annotations

import shutil

from vmdriver.cloudinit import SeedRequest


def base_request(**overrides: object) -> SeedRequest:
    """A small valid request; keyword arguments replace its fields."""
    fields: dict[str, object] = {"instance_id": "nomad-0b9e-web", "hostname": "web-0b9e1d2c"}
    fields.update(overrides)
    return SeedRequest(**fields)  # type: ignore[arg-type]


def have(tool: str) -> bool:
    """True if ``tool`` is on PATH."""
    return shutil.which(tool) is not None
