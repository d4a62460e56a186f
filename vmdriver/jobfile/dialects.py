"""Nomad task dialects by name: ``driver = "qemu"`` and ``driver = "virt"``.

A dialect validates its own ``config {}`` and maps it, with the task facts every
dialect shares (:class:`~vmdriver.jobfile.inputs.TaskInputs`), into a spec. Job
files pick one by ``driver``; the Nomad plugin by the name it is installed as.

A dialect whose VMs need host-side things made first (the virt dialect's pool
volumes and cloud-init seed) does that in ``provision``, once the task dir and
its artifacts are in place, and undoes it in ``release`` (Nomad's DestroyTask,
the end of `vmdriver run`, a failed start).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from vmdriver.errors import SpecError
from vmdriver.host.config import HostConfig
from vmdriver.jobfile import qemu, virt, virt_config
from vmdriver.jobfile.inputs import TaskInputs
from vmdriver.jobfile.placement import Placement, Provisioned
from vmdriver.spec import ArtifactSpec, VMSpec


def _as_is(_cfg: Any, _inputs: TaskInputs, spec: VMSpec, _where: Placement) -> Provisioned:
    return Provisioned(spec)


def _nothing(_host: HostConfig, _alloc_id: str, _task: str) -> list[str]:
    return []


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
    #: ``(validated config, task facts, built spec, placement) -> what to launch``: makes
    #: what the VM needs on the host, after artifacts; idempotent for a restarted task.
    provision: Callable[[Any, TaskInputs, VMSpec, Placement], Provisioned] = _as_is
    #: ``(host, alloc id, task name) -> removed names``: undoes ``provision``.
    release: Callable[[HostConfig, str, str], list[str]] = _nothing


DIALECTS: dict[str, Dialect] = {
    "qemu": Dialect("qemu", qemu.QemuTaskConfig, qemu.parse_config, qemu.build_spec,
                    qemu.legacy_artifacts),
    "virt": Dialect("virt", virt_config.VirtTaskConfig, virt_config.parse_config,
                    virt.build_spec, provision=virt.provision, release=virt.release),
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
