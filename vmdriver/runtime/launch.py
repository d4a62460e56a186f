"""One VM's launch sequence, which the supervisor runs for each VM it starts.

From a prepared request: tap networks, the jail, helper processes, QEMU's
bounded logs, then QEMU itself, confined to the VM's cgroup while paused. Each
step is undone if a later one fails; on success the supervisor owns the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from vmdriver.host.config import HostConfig
from vmdriver.qemu.context import NicFds
from vmdriver.runtime import cgroup
from vmdriver.runtime.helpers import Helper, start_helpers, stop_helpers
from vmdriver.runtime.jailing import plan_jail
from vmdriver.runtime.jailing import release as release_jail
from vmdriver.runtime.logs import open_outputs
from vmdriver.runtime.logserver import WriterServer
from vmdriver.runtime.owned import Owned, has_taps
from vmdriver.runtime.prepare import Prepared
from vmdriver.runtime.process import close_fds
from vmdriver.runtime.request import LaunchRequest
from vmdriver.runtime.vm import VM
from vmdriver.units import parse_size

if TYPE_CHECKING:
    # Netlink and nftables load only for VMs with tap NICs.
    from vmdriver.runtime.networking import Networks, VmLinks

# The supervisor's logger, as before this code moved here: Nomad shows the name
# as the line's @module.
log = logging.getLogger("vmdriver.runtime.supervisor")


def _unlink(paths: tuple[Path, ...]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


async def launch(req: LaunchRequest, prep: Prepared, *, host: HostConfig,
                 networks: Callable[[], Networks], writers: WriterServer,
                 env: Mapping[str, str]) -> Owned:
    """Networks, jail, helpers, QEMU: each undone if a later step fails.

    ``networks`` is the supervisor's, asked for only for a VM with tap NICs (so
    user-mode VMs never load netlink); ``env`` is all QEMU and helpers get.
    """
    vm = VM(req.vm_id, prep.spec, req.dirs)
    vm.remove_task_dir = req.remove_task_dir
    vm.incoming = req.incoming
    vm.configure = req.configure
    async with contextlib.AsyncExitStack() as undo:
        undo.callback(req.dirs.remove_runtime)
        undo.callback(_unlink, prep.created)
        links: VmLinks | None = None
        nic_fds: dict[str, NicFds] = {}
        if has_taps(prep.spec):
            nets = networks()
            links, nic_fds = await nets.attach(req.vm_id, prep.spec)
            undo.push_async_callback(nets.detach, req.vm_id, links)
        ctx = dataclasses.replace(prep.ctx, nic_fds=nic_fds)
        undo.callback(close_fds, ctx.pass_fds)  # launch closes them too; twice is harmless
        jail, warnings = await asyncio.to_thread(
            plan_jail, host, req.vm_id, prep, req.dirs, tuple(map(str, req.image_paths)))
        if jail is not None:
            undo.callback(release_jail, jail)
            vm.jail = jail.record()
        helpers = await start_helpers(prep.helpers, req.dirs.runtime, env,
                                      owner=jail.spec.uid if jail else None)
        undo.push_async_callback(stop_helpers, helpers)
        # QEMU's console and stderr into bounded logs, through a writer the VM owns.
        outputs = await open_outputs(
            req.stdout or req.dirs.task.stdout, req.stderr or req.dirs.task.stderr,
            max_bytes=parse_size(host.max_log_size), log_dir=req.dirs.runtime, server=writers)
        undo.callback(outputs.close)
        if outputs.writer is not None:
            helpers.append(outputs.writer)  # recorded; stopped after QEMU, also by `undo`
        vm.helpers = [h.record() for h in helpers]
        for warning in warnings:  # also in `vmdriver fingerprint`
            # Without a jail it is a warning; with one, a note about its strength.
            log.log(logging.WARNING if jail is None else logging.INFO, "VM %s: %s",
                    req.vm_id, warning)
        placed: list[str] = []
        undo.callback(lambda: cgroup.remove(vm.cgroups_created))
        await vm.launch(ctx, env=env, stdout=req.stdout, stderr=req.stderr, outputs=outputs,
                        on_spawn=functools.partial(_confine, req, prep, vm, helpers, placed),
                        jail=jail.spec if jail else None)
        undo.pop_all()
    return Owned(vm, helpers, prep.ctx.accelerator, tuple(placed), links, jail)


def _confine(req: LaunchRequest, prep: Prepared, vm: VM, helpers: list[Helper],
             warnings: list[str], pid: int) -> None:
    """QEMU (and a jail's monitor) and its helpers into the VM's cgroup, while paused."""
    if req.confinement is None or not req.confinement.available():
        return
    c = req.confinement
    placement = cgroup.apply(pid, c.limits(prep.spec, prep.ctx.accelerator), c.scope,
                             parent=c.parent, cpuset_cgroup=c.cpuset_cgroup)
    vm.cgroup_paths, vm.cgroups_created = placement.paths, placement.created
    warnings.extend(placement.warnings)
    # QEMU was forked inside the jail before its monitor moved: it joins by itself.
    for other in (vm.qemu_pid, *(h.proc.pid for h in helpers)):
        if other is not None:
            cgroup.join(other, placement.paths)
