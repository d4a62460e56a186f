"""A runner config turned into what the supervisor runs: one :class:`LaunchRequest`.

The runner's dirs map onto the core's :class:`VMDirs`:

- the runtime dir is the VM's runtime dir, with VM-Operator's socket names: the guest
  agent on ``org.qemu.guest_agent.0`` and QMP on ``monitor.sock``. The supervisor
  talks QMP over the socketpair it hands QEMU at launch, so the ``monitor.sock``
  monitor (the core's re-attach socket) is free for an operator's own client while
  the runner runs;
- the data dir is the VM's data dir (EFI vars, TPM state, UUID, template copy);
- the task dir (QEMU's working directory, empty) is ``<runtimeDir>/task``, so it goes
  with the runtime dir.

The core puts QEMU's sockets in a subdir of the runtime dir (``vm/``, the part a
jailed QEMU may write); :func:`link_sockets` gives them VM-Operator's places.

The drives the operator's config names are this VM's allowed image paths: the config
file is the operator's, as a host config's ``image_paths`` are.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from vmdriver.runner.config import RunnerConfig
from vmdriver.runner.paths import RunnerPaths
from vmdriver.runner.spec import HostFacts, runner_spec
from vmdriver.runtime.request import LaunchRequest
from vmdriver.runtime.taskdir import TaskDir, VMDirs
from vmdriver.spec import Seed, VMSpec

#: Our QMP socket name is the core's re-attach socket; VM-Operator's name for it.
MONITOR_SOCKET = "monitor.sock"
GUEST_AGENT_SOCKET = "org.qemu.guest_agent.0"
#: The task dir's name under the runtime dir.
TASK = "task"
#: QEMU's own messages and the serial console go to the runner's stderr and stdout (a
#: pod's log), unless the caller names files.
STDOUT, STDERR = Path("/dev/stdout"), Path("/dev/stderr")


def vm_dirs(paths: RunnerPaths) -> VMDirs:
    """The core's dirs for a runner's VM."""
    return VMDirs(task=TaskDir(paths.runtime_dir, TASK), runtime=paths.runtime_dir,
                  data=paths.data_dir, qmp_name=MONITOR_SOCKET, qga_name=GUEST_AGENT_SOCKET)


def link_sockets(dirs: VMDirs) -> None:
    """``<runtimeDir>/monitor.sock`` and ``org.qemu.guest_agent.0`` as VM-Operator has them:
    symlinks to the core's sockets (a unix socket is reached through a symlink)."""
    for sock in (dirs.qmp_socket, dirs.qga_socket):
        link = dirs.runtime / sock.name
        if sock.parent == dirs.runtime or link.is_symlink():
            continue
        link.symlink_to(sock.relative_to(dirs.runtime))


def drive_paths(config: RunnerConfig) -> tuple[Path, ...]:
    """The host files and devices the config's drives name (made absolute)."""
    out = []
    for drive in config.vm.drives:
        path = drive.file or drive.device or drive.resource
        if path:
            out.append(Path(os.path.realpath(path)))
    return tuple(out)


def cloud_init_seed(config: RunnerConfig, config_mtime: float) -> Seed | None:
    """VM-Operator's NoCloud data as the spec's seed (a FAT image labelled CIDATA).

    As in VM-Operator, a missing ``instance-id`` is ``v<config mtime>`` and user-data
    gets the ``#cloud-config`` header.
    """
    ci = config.cloud_init
    if ci is None:
        return None
    meta = dict(ci.meta_data or {})
    meta.setdefault("instance-id", f"v{int(config_mtime)}")
    files = [("meta-data", yaml.safe_dump(meta, sort_keys=False)),
             ("user-data", "#cloud-config\n" + yaml.safe_dump(ci.user_data or {}, sort_keys=False))]
    if ci.network_config is not None:
        files.append(("network-config", yaml.safe_dump(ci.network_config, sort_keys=False)))
    return Seed(files=tuple(files), format="fat")


def runner_vm_spec(config: RunnerConfig, paths: RunnerPaths, facts: HostFacts,
                   config_mtime: float = 0.0) -> VMSpec:
    """The template's spec, with the cloud-init seed added."""
    spec = runner_spec(config, paths, facts)
    seed = cloud_init_seed(config, config_mtime)
    return spec if seed is None else spec.model_copy(update={"seed": seed})


def launch_request(config: RunnerConfig, paths: RunnerPaths, spec: VMSpec, *,
                   stdout: Path = STDOUT, stderr: Path = STDERR) -> LaunchRequest:
    """The request the supervisor starts the runner's VM from."""
    return LaunchRequest(vm_id=config.vm.name, spec=spec, dirs=vm_dirs(paths),
                         stdout=stdout, stderr=stderr, where=f"vm {config.vm.name}",
                         image_paths=drive_paths(config))
