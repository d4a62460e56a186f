"""Nomad task dialects by name: ``driver = "qemu"`` (and ``"virt"`` next).

A dialect validates its own ``config {}`` and maps it, with the task facts every
dialect shares (:class:`~vmdriver.jobfile.inputs.TaskInputs`), into a spec. Job
files pick one by ``driver``; the Nomad plugin by the name it is installed as.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from vmdriver.errors import SpecError
from vmdriver.jobfile import qemu
from vmdriver.jobfile.inputs import TaskInputs
from vmdriver.spec import ArtifactSpec, VMSpec


@dataclass(frozen=True)
class Dialect:
    """One task dialect: how its config is read and what VM it describes."""

    name: str
    #: The config model (its fields are the plugin's TaskConfigSchema).
    model: type[BaseModel]
    #: ``(raw config, where) -> validated config``; SpecError names the field.
    parse: Callable[[dict[str, Any], str], Any]
    #: ``(validated config, task facts) -> spec``.
    build: Callable[[Any, TaskInputs], VMSpec]
    #: Artifacts the config itself implies (the qemu dialect's seed-era ``image_source``).
    artifacts: Callable[[Any], tuple[ArtifactSpec, ...]] = lambda _cfg: ()


DIALECTS: dict[str, Dialect] = {
    "qemu": Dialect("qemu", qemu.QemuTaskConfig, qemu.parse_config, qemu.build_spec,
                    qemu.legacy_artifacts),
}


def dialect_for_plugin(name: str) -> Dialect:
    """The dialect of a plugin installed as ``name``: ``virt`` jobs for the virt driver's names."""
    if name in ("virt", "nomad-driver-virt") and "virt" in DIALECTS:
        return DIALECTS["virt"]
    return DIALECTS["qemu"]


def dialect(name: str, *, where: str = "driver") -> Dialect:
    """The dialect called ``name``; SpecError listing the known ones otherwise."""
    try:
        return DIALECTS[name]
    except KeyError:
        raise SpecError("unknown task driver", where=where, value=name,
                        allowed=sorted(DIALECTS)) from None
