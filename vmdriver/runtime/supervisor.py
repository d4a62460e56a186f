"""The supervisor: many VMs in one process, started, recovered, stopped, measured.

Every face uses this class and nothing below it: the CLI's `run`, the Nomad
plugin and the pod runner launch, stop and measure VMs only through here.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from vmdriver.errors import TaskNotFound, VmdriverError
from vmdriver.host.config import HostConfig
from vmdriver.runtime.prepare import Prepared, prepare
from vmdriver.runtime.record import VMRecord
from vmdriver.runtime.state import ExitResult
from vmdriver.runtime.taskdir import TaskDir
from vmdriver.runtime.vm import VM
from vmdriver.spec import VMSpec

log = logging.getLogger(__name__)


class Supervisor:
    """Owns the VMs of one vmdriver process."""

    def __init__(self, host: HostConfig | None = None) -> None:
        self.host = host or HostConfig()
        self._vms: dict[str, VM] = {}

    def __contains__(self, vm_id: str) -> bool:
        return vm_id in self._vms

    def get(self, vm_id: str) -> VM:
        """The VM with this id; :class:`TaskNotFound` if there is none."""
        try:
            return self._vms[vm_id]
        except KeyError:
            raise TaskNotFound(f"no VM with id {vm_id!r}") from None

    def vms(self) -> list[VM]:
        """Every VM this supervisor knows, running or exited."""
        return list(self._vms.values())

    async def prepare(self, spec: VMSpec, task_dir: TaskDir, *, where: str = "") -> Prepared:
        """Policy and host checks, off the event loop (they run qemu-img and may probe KVM)."""
        return await asyncio.to_thread(prepare, spec, task_dir, self.host, where=where)

    async def start(
        self,
        vm_id: str,
        spec: VMSpec,
        task_dir: TaskDir,
        *,
        env: Mapping[str, str] | None = None,
        stdout: Path | None = None,
        stderr: Path | None = None,
        prepared: Prepared | None = None,
        on_spawn: Callable[[int], None] | None = None,
    ) -> VM:
        """Check, launch and register a VM; returns once the guest is running.

        ``on_spawn`` is passed to :meth:`VM.launch` (called with QEMU's pid while paused).
        """
        if vm_id in self._vms:
            raise VmdriverError(f"a VM with id {vm_id!r} is already started")
        task_dir.create()
        prepared = prepared or await self.prepare(spec, task_dir)
        vm = VM(vm_id, prepared.spec, task_dir)
        self._vms[vm_id] = vm
        try:
            await vm.launch(prepared.ctx, env=self._env(env), stdout=stdout, stderr=stderr,
                            on_spawn=on_spawn)
        except BaseException:
            del self._vms[vm_id]
            raise
        return vm

    async def recover(self, record: VMRecord) -> VM:
        """Re-attach to a VM an earlier process started; a no-op if already tracked."""
        if record.id in self._vms:
            return self._vms[record.id]
        vm = await VM.attach(record)
        self._vms[record.id] = vm
        return vm

    async def stop(self, vm_id: str, timeout: float | None = None,
                   signal: str | None = None) -> ExitResult:
        """Stop a VM with its shutdown ladder."""
        return await self.get(vm_id).stop(timeout, signal)

    def forget(self, vm_id: str) -> None:
        """Drop an exited VM from the table."""
        self._vms.pop(vm_id, None)

    async def stop_all(self, timeout: float | None = None) -> None:
        """Stop every running VM at once (used on SIGINT/SIGTERM of `vmdriver run`)."""
        running = [vm for vm in self._vms.values() if vm.result is None]
        results = await asyncio.gather(*(vm.stop(timeout) for vm in running), return_exceptions=True)
        for vm, res in zip(running, results, strict=True):
            if isinstance(res, BaseException):
                log.error("stopping VM %s failed: %s", vm.id, res)

    async def detach_all(self) -> None:
        """Stop supervising every VM but leave them running (a plugin shutting down)."""
        await asyncio.gather(*(vm.detach() for vm in self._vms.values()))
        self._vms.clear()

    @staticmethod
    def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
        # QEMU gets a small, predictable environment plus the task's own.
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
        env.update(extra or {})
        return env
