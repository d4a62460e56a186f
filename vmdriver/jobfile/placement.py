"""Where a task runs and what its dialect made for it: the ``provision`` hook's types.

A dialect whose VMs need host-side things made first (the virt dialect's pool
volumes and cloud-init seed) gets a :class:`Placement` once the task dir and its
artifacts are in place, and answers with a :class:`Provisioned`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmdriver.host.config import HostConfig
from vmdriver.runtime.taskdir import TaskDir
from vmdriver.spec import VMSpec


@dataclass(frozen=True)
class Placement:
    """Where one task runs: what ``provision`` needs besides the config and the task facts."""

    host: HostConfig
    alloc_id: str
    task_dir: TaskDir
    #: Only show what would be made (`vmdriver argv`): nothing is created or opened.
    preview: bool = False


@dataclass(frozen=True)
class Provisioned:
    """The spec to launch, and host paths its drives may come from besides the policy's own."""

    spec: VMSpec
    #: Extra ``image_paths`` for this VM only (the pools holding its volumes).
    image_paths: tuple[Path, ...] = ()
