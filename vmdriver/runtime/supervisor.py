"""The supervisor: many VMs in one process, each owned from prepare to cleanup.

Every face uses this class and nothing below it: `vmdriver run`, the Nomad
plugin and the pod runner hand it :class:`LaunchRequest`\\ s and VM ids, and get
back :class:`VMInfo` snapshots and :class:`ExitResult`\\ s. For each VM the
supervisor does, in order: prepare (policy, images opened as fds, closed on
every path), helper processes, launch with the VM confined to its cgroup while
paused, the stop ladder on request, and when QEMU has exited: helpers stopped,
cgroups removed, the runtime dir (and, if asked, the task dir) removed. The launch
steps are in :mod:`vmdriver.runtime.launch`; what is held for each VM, and
:class:`VMInfo`, in :mod:`vmdriver.runtime.owned`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmdriver.errors import InputError, StateError, TaskNotFound
from vmdriver.host.config import HostConfig
from vmdriver.qemu.agent import GuestAgent
from vmdriver.qemu.argv import render_argv
from vmdriver.runtime import cgroup
from vmdriver.runtime.events import EventStream, Listener
from vmdriver.runtime.helpers import attach_helpers, stop_helpers
from vmdriver.runtime.jailing import release as release_jail
from vmdriver.runtime.launch import launch
from vmdriver.runtime.logs import LOG_WRITER
from vmdriver.runtime.logserver import WriterServer
from vmdriver.runtime.owned import Owned, VMInfo, has_taps
from vmdriver.runtime.prepare import Prepared, prepare
from vmdriver.runtime.process import ManagedProcess
from vmdriver.runtime.record import VMRecord, records_under
from vmdriver.runtime.request import LaunchRequest
from vmdriver.runtime.snapshots import plan_start
from vmdriver.runtime.state import ExitResult
from vmdriver.runtime.vm import VM
from vmdriver.spec import StopSignal

if TYPE_CHECKING:
    # Netlink and nftables load only for VMs with tap NICs.
    from vmdriver.network.discovery import GuestAddresses
    from vmdriver.runtime.networking import Networks

# VMInfo lives in owned.py; the faces import it from here, with the Supervisor.
__all__ = ["Supervisor", "VMInfo"]

log = logging.getLogger(__name__)

#: The only environment variables of vmdriver's own that reach QEMU and helpers.
_HOST_ENV = ("PATH", "LANG", "LC_ALL")


def _remove_unused_dirs(req: LaunchRequest) -> None:
    """A VM that never started leaves no runtime dir, and no empty data dir."""
    req.dirs.remove_runtime()
    with contextlib.suppress(OSError):
        req.dirs.data.rmdir()  # only when empty: a restart's UEFI vars or TPM state stay


class Supervisor:
    """Owns the VMs of one vmdriver process."""

    def __init__(self, host: HostConfig | None = None) -> None:
        self.host = host or HostConfig()
        self._vms: dict[str, Owned] = {}
        self._networks: Networks | None = None
        self._writers = WriterServer()

    @property
    def networks(self) -> Networks:
        """Tap networking, set up on first use (user-mode VMs never load netlink)."""
        if self._networks is None:
            from vmdriver.runtime.networking import Networks

            self._networks = Networks(self.host)
        return self._networks

    # Section: looking

    def __contains__(self, vm_id: str) -> bool:
        return vm_id in self._vms

    def ids(self) -> list[str]:
        """Every VM this supervisor knows, running or exited."""
        return list(self._vms)

    def info(self, vm_id: str) -> VMInfo:
        """A snapshot of the VM; :class:`TaskNotFound` if there is none."""
        owned = self._get(vm_id)
        vm = owned.vm
        return VMInfo(vm.id, vm.state, vm.pid, owned.accelerator, vm.stdout, vm.stderr, vm.result,
                      vm.started_at, vm.dirs.qmp_socket, vm.cgroup_paths, owned.warnings,
                      owned.addresses)

    def oom_killed(self, vm_id: str) -> bool:
        """True if the kernel OOM-killed a process in the VM's cgroups."""
        return cgroup.oom_kills(self._get(vm_id).vm.cgroup_paths) > 0

    def record(self, vm_id: str) -> VMRecord:
        """What a later supervisor needs to re-attach (Nomad's driver_state)."""
        return self._get(vm_id).vm.record()

    async def wait_addresses(self, vm_id: str, timeout: float) -> tuple[str, ...]:
        """The guest's addresses on tap NICs, waiting up to ``timeout`` for the first."""
        links = self._get(vm_id).links
        if links is None:
            return ()
        return tuple(str(a) for a in (await links.wait(timeout)).addresses)

    def on_addresses(self, vm_id: str, listener: Callable[[tuple[str, ...]], None]) -> None:
        """Call ``listener`` with the guest's addresses each time they change (tap NICs)."""
        links = self._get(vm_id).links
        if links is not None:
            links.listeners.append(lambda found: listener(tuple(map(str, found.addresses))))

    def on_event(self, vm_id: str, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with each QMP event of the VM (a dict: ``event``, ``data``,
        ``timestamp``) until it ends; returns what unsubscribes. It runs in the VM's
        event reader, so must not block; one that raises is logged and dropped."""
        return self._get(vm_id).vm.listeners.add(listener)

    @contextlib.asynccontextmanager
    async def events(self, vm_id: str, *names: str) -> AsyncIterator[EventStream]:
        """The VM's QMP events named (all if none are) as an async iterator, subscribed
        while the block runs, so nothing sent meanwhile is missed; it ends with the VM."""
        stream = EventStream(names)
        unsubscribe = self._get(vm_id).vm.listeners.add(stream.put, stream.end)
        try:
            yield stream
        finally:
            unsubscribe()

    def agent(self, vm_id: str) -> GuestAgent:
        """The VM's guest agent (its calls fail clearly when the task has none)."""
        vm = self._get(vm_id).vm
        if not vm.spec.guest_agent:
            raise StateError(vm_id, "without a guest agent", "started with guest_agent = true")
        return GuestAgent(vm.dirs.qga_socket)

    async def qmp(self, vm_id: str, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Run a QMP command on a running VM."""
        return await self._get(vm_id).vm.qmp(cmd, args)

    async def add_fd(self, vm_id: str, fd: int) -> str:
        """Hand a running VM's QEMU an open file (QMP ``add-fd`` over SCM_RIGHTS); the
        ``/dev/fdset/N`` path to name it by (``blockdev-change-medium filename=``).

        A jailed QEMU cannot open host paths: a face opens the file and passes it. The
        caller closes ``fd``; ``remove-fd fdset-id=N`` frees QEMU's copy once unused.
        """
        return await self._get(vm_id).vm.add_fd(fd)

    def signal(self, vm_id: str, sig: int) -> None:
        """Signal the VM's QEMU, jailed or not, with the effect the signal has on an
        unjailed QEMU (a no-op once it has exited)."""
        self._get(vm_id).vm.signal(sig)

    @staticmethod
    def known(state_dir: Path) -> list[tuple[VMRecord, bool]]:
        """Every VM recorded under a state dir, and whether its QEMU still runs."""
        out = []
        for rec in records_under(state_dir):
            proc = ManagedProcess.attach(rec.pid, rec.pid_start_time)
            if proc is not None:
                proc.close()
            out.append((rec, proc is not None))
        return out

    def argv(self, req: LaunchRequest) -> tuple[str, ...]:
        """The argv ``req`` would run with, launching nothing (fds shown as numbers to come)."""
        prep = prepare(req.spec, req.dirs, self.host, vm_id=req.vm_id, where=req.where,
                       preview=True, volume_dirs=tuple(req.image_paths))
        return render_argv(prep.spec, prep.ctx)

    # Section: starting

    async def prepare(self, req: LaunchRequest, *, preview: bool = False) -> Prepared:
        """Policy and host checks, off the event loop (they run qemu-img and may probe KVM)."""
        return await asyncio.to_thread(prepare, req.spec, req.dirs, self.host, vm_id=req.vm_id,
                                       where=req.where, preview=preview,
                                       volume_dirs=tuple(req.image_paths))

    def _plan(self, req: LaunchRequest) -> tuple[LaunchRequest, Prepared]:
        """Dirs, then the start's plan (from a snapshot, or resuming a suspended task:
        disks, ``-incoming``, the loader), then :func:`prepare`."""
        req.dirs.create()
        req = plan_start(req, self.host)
        return req, prepare(req.spec, req.dirs, self.host, vm_id=req.vm_id, where=req.where,
                            volume_dirs=tuple(req.image_paths))

    async def start(self, req: LaunchRequest) -> VMInfo:
        """Prepare, launch and own one VM; returns once the guest is running."""
        return (await self.start_many([req]))[0]

    async def start_many(self, reqs: list[LaunchRequest]) -> list[VMInfo]:
        """Prepare every VM first (any bad one starts none), then launch them in order.

        If a launch fails, the VMs launched before it keep running (the caller
        decides: `vmdriver run` stops them); prepared ones not launched are released.
        """
        for req in reqs:
            if req.vm_id in self._vms:
                raise InputError("a VM with this id is already started", where=req.vm_id)
        reqs, pending = list(reqs), []
        try:
            for i, req in enumerate(reqs):
                # One trip to a thread for each VM's file work: the event loop meanwhile
                # serves the QMP handshakes of VMs launched alongside.
                reqs[i], prep = await asyncio.to_thread(self._plan, req)
                pending.append(prep)
            out = []
            for req in reqs:
                # Launching hands the fds to QEMU (and closes ours) whatever happens.
                out.append(await self._launch(req, pending.pop(0)))
            return out
        except BaseException:
            for req in reqs:
                if req.vm_id not in self._vms:
                    _remove_unused_dirs(req)
            raise
        finally:
            for prep in pending:
                prep.close()

    async def _launch(self, req: LaunchRequest, prep: Prepared) -> VMInfo:
        """Launch one prepared VM (the steps are in :mod:`vmdriver.runtime.launch`) and own it."""
        owned = await launch(req, prep, host=self.host, networks=lambda: self.networks,
                             writers=self._writers, env=self._env(req.env))
        if owned.links is not None:
            self._watch_addresses(owned)
        return self._own(owned)

    def _watch_addresses(self, owned: Owned) -> None:
        """Discovery for the VM's life; ``owned.addresses`` follows it (Nomad, `ps`)."""
        assert owned.links is not None

        def found(addrs: GuestAddresses) -> None:
            owned.addresses = tuple(str(a) for a in addrs.addresses)

        self.networks.watch_vm(owned.links, owned.vm, found)

    def _own(self, owned: Owned) -> VMInfo:
        self._vms[owned.vm.id] = owned
        owned.finished = asyncio.create_task(self._finish(owned), name=f"owner of {owned.vm.id}")
        return self.info(owned.vm.id)

    async def _finish(self, owned: Owned) -> None:
        """After QEMU exits: helpers, cgroups, runtime dir (and task dir, if asked)."""
        vm = owned.vm
        with contextlib.suppress(Exception):
            await vm.wait()
        await stop_helpers(owned.helpers)
        if owned.links is not None or has_taps(vm.spec):
            await self.networks.detach(vm.id, owned.links)
        if owned.jail is not None:
            await asyncio.to_thread(release_jail, owned.jail)
        cgroup.remove(vm.cgroups_created)
        vm.dirs.remove_runtime()
        if vm.remove_task_dir:
            shutil.rmtree(vm.dirs.task.path, ignore_errors=True)

    async def recover(self, record: VMRecord) -> VMInfo:
        """Re-attach to a VM an earlier process started; a no-op if already owned.

        If the VM is gone, its helpers, cgroups and runtime dir are cleaned up and
        :class:`StateError` says so.
        """
        if record.id in self._vms:
            return self.info(record.id)
        helpers = attach_helpers(record.helpers)
        try:
            vm = await VM.attach(record, next((h for h in helpers if h.name == LOG_WRITER), None))
        except StateError:
            await stop_helpers(helpers)
            cgroup.remove(record.cgroups_created)
            shutil.rmtree(record.runtime_dir, ignore_errors=True)
            if any(n.get("kind") in ("tap", "macvtap") for n in record.spec.get("nics", ())):
                await self.networks.detach(record.id, None)  # its chains, a macvtap link
            raise
        owned = Owned(vm, helpers, "kvm" if "-enable-kvm" in record.argv else "tcg")
        if has_taps(vm.spec):
            # Also removes what the dead supervisor left of gone VMs, and runs the
            # managed networks' dnsmasq under this supervisor from now on.
            owned.links = await self.networks.recover(vm.id, vm.spec)
            if owned.links is not None:
                self._watch_addresses(owned)
        return self._own(owned)

    # Section: stopping

    async def stop(self, vm_id: str, timeout: float | None = None,
                   signal: StopSignal | None = None) -> ExitResult:
        """Stop a VM with its shutdown ladder; returns once it is cleaned up."""
        owned = self._get(vm_id)
        result = await owned.vm.stop(timeout, signal)
        await self._finished(owned)
        return result

    async def kill(self, vm_id: str) -> ExitResult:
        """Stop at once with SIGKILL (Nomad's forced DestroyTask, a second Ctrl-C)."""
        owned = self._get(vm_id)
        result = await owned.vm.kill()
        await self._finished(owned)
        return result

    async def wait(self, vm_id: str) -> ExitResult:
        """Wait for the VM to end and be cleaned up."""
        owned = self._get(vm_id)
        result = await owned.vm.wait()
        await self._finished(owned)
        return result

    async def destroy(self, vm_id: str, *, force: bool = False) -> None:
        """Forget a VM; ``force`` kills one that still runs. Unknown ids are a no-op."""
        owned = self._vms.get(vm_id)
        if owned is None:
            return
        if owned.vm.result is None:
            if not force:
                raise InputError("VM is still running; stop it first or destroy with force",
                                 where=vm_id)
            await self.kill(vm_id)
        await self._finished(owned)
        del self._vms[vm_id]

    async def stop_all(self, timeout: float | None = None) -> None:
        """Stop every running VM at once (SIGINT/SIGTERM of `vmdriver run`)."""
        running = [i for i, o in self._vms.items() if o.vm.result is None]
        results = await asyncio.gather(*(self.stop(i, timeout) for i in running),
                                       return_exceptions=True)
        for vm_id, res in zip(running, results, strict=True):
            if isinstance(res, BaseException):
                log.error("stopping VM %s failed: %s", vm_id, res)

    async def kill_all(self) -> None:
        """SIGKILL every VM that still runs."""
        await asyncio.gather(*(self.kill(i) for i, o in self._vms.items() if o.vm.result is None),
                             return_exceptions=True)

    async def close(self) -> None:
        """Stop what the supervisor itself runs (managed networks' dnsmasq, the log
        writers' server; the writers of VMs still running carry on)."""
        await self._writers.close()
        if self._networks is not None:
            await self._networks.close()

    async def detach_all(self) -> None:
        """Stop supervising every VM but leave them and their helpers running."""
        for owned in self._vms.values():
            if owned.finished is not None:
                owned.finished.cancel()
        await asyncio.gather(*(o.vm.detach() for o in self._vms.values()))
        for owned in self._vms.values():
            for helper in owned.helpers:
                helper.proc.close()
        self._vms.clear()

    # Section: internals

    def _get(self, vm_id: str) -> Owned:
        try:
            return self._vms[vm_id]
        except KeyError:
            raise TaskNotFound(f"no VM with id {vm_id!r}") from None

    @staticmethod
    async def _finished(owned: Owned) -> None:
        if owned.finished is not None:
            await asyncio.shield(owned.finished)

    @staticmethod
    def _env(extra: Mapping[str, str]) -> dict[str, str]:
        """A small, predictable environment: a few of ours, and Nomad's ``NOMAD_*`` names.

        The task's own env never reaches QEMU: a job's ``LD_PRELOAD`` or ``TMPDIR``
        would run job code, or redirect files, inside a process that runs as root
        before its seccomp filter applies. It belongs in the guest (cloud-init).
        """
        env = {k: v for k, v in os.environ.items() if k in _HOST_ENV}
        env.update({k: v for k, v in extra.items() if k.startswith("NOMAD_") and "\0" not in v})
        return env
