"""The two in-process arms: vmdriver's Supervisor, and the bare harness on the same argv.

Each arm runs in its own worker process (:mod:`bench.worker`) so that the
supervisor's memory can be read as that process's PSS, with nothing of the
benchmark coordinator in it. Both arms import vmdriver: the bare arm renders
its argv with vmdriver's own renderer, *before* its clock starts, so the two
launch byte-identical command lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from bench.bare import BareVM
from bench.common import GUEST, READY, boot_spec, make_overlay, pss_kib, tiny_spec
from vmdriver.host.config import HostConfig
from vmdriver.qemu.argv import render_argv
from vmdriver.runtime.console import wait_for_line
from vmdriver.runtime.prepare import prepare
from vmdriver.runtime.request import LaunchRequest
from vmdriver.runtime.supervisor import Supervisor
from vmdriver.runtime.taskdir import TaskDir, VMDirs
from vmdriver.spec import VMSpec

BOOT_TIMEOUT_S = 180.0


class Arm:
    """What both arms offer the worker; every method returns a JSON-able dict."""

    name = ""

    def __init__(self, root: Path, jail: str = "off") -> None:
        self.root = root
        self.host = HostConfig.model_validate(
            {"state_dir": root, "image_paths": (str(root), str(GUEST.resolve())), "jail": jail})
        self._count = 0

    def _next(self) -> tuple[str, VMDirs]:
        self._count += 1
        # Short names: the socket paths must stay under 108 bytes.
        vm_id = f"v{self._count}"
        dirs = VMDirs.under(self.root, vm_id, TaskDir(self.root / f"a{self._count}", "t"))
        # Nomad makes the task dir before StartTask: not part of a driver's start (as in
        # wave 1's runs). vmdriver's own runtime, socket and data dirs stay on its clock.
        dirs.task.create()
        return vm_id, dirs

    def _spec(self, kind: str, name: str, task_dir: TaskDir) -> VMSpec:
        if kind == "boot":
            # guest/out may be re-pointed at a rebuilt guest while the run goes on.
            self.host = self.host.model_copy(update={"image_paths": (str(self.root), str(GUEST.resolve()))})
            self._host_changed()
            return boot_spec(name, make_overlay(task_dir.path / "local" / "disk.qcow2"))
        return tiny_spec(name)

    def _host_changed(self) -> None:
        """Hook for arms that hand the host config on."""

    async def start(self, n: int, kind: str) -> dict[str, Any]:
        """Start ``n`` VMs at once; per-VM seconds from the request to running (and ready)."""
        raise NotImplementedError

    async def poweroff(self) -> dict[str, Any]:
        """Press the power button of every VM; how long until its exit was reported."""
        raise NotImplementedError

    async def kill(self) -> dict[str, Any]:
        """SIGKILL every VM, concurrently; per-VM seconds until the exit was reported."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        """QEMU pids of the live VMs."""
        raise NotImplementedError

    def argv(self) -> list[str]:
        """The argv of the most recent VM."""
        raise NotImplementedError

    def jailed(self) -> bool:
        """Whether the most recent VM runs in a jail."""
        return False

    async def scale(self, top: int, checkpoints: list[int]) -> dict[str, Any]:
        """Start VMs one by one up to ``top``; each start's time, and PSS at the checkpoints."""
        times: list[float] = []
        pss: dict[int, int] = {0: await self.pss()}
        for k in range(1, top + 1):
            res = await self.start(1, "tiny")
            if "error" in res:
                return {"error": res["error"], "times": times, "pss": pss}
            times.append(res["each"][0])
            if k in checkpoints:
                pss[k] = await self.pss()
        return {"times": times, "pss": pss}

    @staticmethod
    async def pss() -> int:
        """This process's PSS in KiB, after a short settle."""
        await asyncio.sleep(0.3)
        return pss_kib()


class VmdriverArm(Arm):
    """vmdriver through its API: one :class:`Supervisor` for every VM of the run."""

    name = "vmdriver"

    def __init__(self, root: Path, jail: str = "off") -> None:
        """``jail``: the host config's; "off" launches the bare arm's argv, "preferred" is the default."""
        super().__init__(root, jail)
        self.sup = Supervisor(self.host)
        #: Ids of the VMs started and not yet stopped.
        self.live: list[str] = []

    def _host_changed(self) -> None:
        self.sup.host = self.host

    async def start(self, n: int, kind: str) -> dict[str, Any]:
        reqs = []
        for _ in range(n):
            vm_id, dirs = self._next()
            reqs.append(LaunchRequest(vm_id=vm_id, spec=self._spec(kind, "t", dirs.task), dirs=dirs))
        t0 = time.perf_counter()

        async def one(req: LaunchRequest) -> tuple[str, float, float]:
            vm = await self.sup.start(req)
            running = time.perf_counter() - t0
            ready = float("nan")
            if kind == "boot":
                await wait_for_line(vm.stdout, READY, BOOT_TIMEOUT_S)
                ready = time.perf_counter() - t0
            return vm.id, running, ready

        results = await asyncio.gather(*(one(r) for r in reqs), return_exceptions=True)
        wall = time.perf_counter() - t0
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        good = [r for r in results if not isinstance(r, BaseException)]
        self.live += [vm_id for vm_id, _, _ in good]
        out: dict[str, Any] = {"wall": wall, "each": [r for _, r, _ in good],
                               "ready": [r for _, _, r in good]}
        if errors:
            out["error"] = errors[0]
        return out

    async def poweroff(self) -> dict[str, Any]:
        calls, after = [], []
        kinds = []
        for vm_id in list(self.live):
            watch = await _ShutdownWatch.open(self.sup.info(vm_id).qmp_socket)
            t0 = time.perf_counter()
            res = await self.sup.stop(vm_id)
            returned = time.time()
            calls.append(time.perf_counter() - t0)
            shutdown = await watch.stamp()
            after.append(returned - shutdown if shutdown else float("nan"))
            kinds.append(res.kind.name)
            await self._forget(vm_id)
        return {"call": calls, "after_shutdown": after, "kinds": kinds}

    async def kill(self) -> dict[str, Any]:
        async def one(vm_id: str) -> float:
            t0 = time.perf_counter()
            await self.sup.kill(vm_id)
            return time.perf_counter() - t0

        ids = list(self.live)
        times = await asyncio.gather(*(one(i) for i in ids))
        for vm_id in ids:
            await self._forget(vm_id)
        return {"each": list(times)}

    async def _forget(self, vm_id: str) -> None:
        self.live.remove(vm_id)
        await self.sup.destroy(vm_id)

    def pids(self) -> list[int]:
        return [pid for i in self.live if (pid := self.sup.info(i).pid)]

    def argv(self) -> list[str]:
        return list(self.sup.record(self.live[-1]).argv) if self.live else []

    def jailed(self) -> bool:
        """Whether the most recent VM runs in a jail (the probe may have ruled it out)."""
        return bool(self.live) and self.sup.record(self.live[-1]).jail is not None


class BareArm(Arm):
    """The floor: identical argv, the minimal harness of :mod:`bench.bare`."""

    name = "bare"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.live: list[BareVM] = []

    async def start(self, n: int, kind: str) -> dict[str, Any]:
        vms, dirs = [], []
        for _ in range(n):
            vm_id, vdirs = self._next()
            vdirs.create()
            # vmdriver's checks and renderer, before the clock: both arms launch the same argv.
            prep = prepare(self._spec(kind, "t", vdirs.task), vdirs, self.host, vm_id=vm_id)
            ours, theirs = BareVM.socketpair()
            ctx = dataclasses.replace(prep.ctx, qmp_fd=theirs.fileno())
            # Image fds the renderer names in -add-fd (where prepare opened the images).
            vms.append(BareVM(render_argv(prep.spec, ctx), ours, theirs, ctx.pass_fds))
            dirs.append(vdirs.task.path)
        boot = kind == "boot"
        t0 = time.perf_counter()
        for vm, cwd in zip(vms, dirs, strict=True):
            vm.spawn(cwd=cwd, console=boot)

        async def one(vm: BareVM) -> tuple[float, float]:
            await vm.connect()
            running = time.perf_counter() - t0
            ready = await asyncio.wait_for(vm.wait_line(READY), BOOT_TIMEOUT_S) - t0 if boot else float("nan")
            return running, ready

        results = await asyncio.gather(*(one(vm) for vm in vms), return_exceptions=True)
        wall = time.perf_counter() - t0
        self.live += vms
        good = [r for r in results if not isinstance(r, BaseException)]
        out: dict[str, Any] = {"wall": wall, "each": [r for r, _ in good], "ready": [r for _, r in good]}
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        if errors:
            out["error"] = errors[0]
        return out

    async def poweroff(self) -> dict[str, Any]:
        calls, after = [], []
        for vm in list(self.live):
            t0 = time.perf_counter()
            await vm.execute("system_powerdown")
            shutdown = await vm.wait_event("SHUTDOWN")
            exited = await vm.wait()
            calls.append(time.perf_counter() - t0)
            after.append(exited - shutdown)
            await vm.close()
            self.live.remove(vm)
        return {"call": calls, "after_shutdown": after, "kinds": ["STOPPED"] * len(calls)}

    async def kill(self) -> dict[str, Any]:
        async def one(vm: BareVM) -> float:
            t0 = time.perf_counter()
            vm.kill()
            await vm.wait()
            return time.perf_counter() - t0

        vms = list(self.live)
        times = await asyncio.gather(*(one(vm) for vm in vms))
        for vm in vms:
            await vm.close()
            self.live.remove(vm)
        return {"each": list(times)}

    def pids(self) -> list[int]:
        return [vm.pid for vm in self.live]

    def argv(self) -> list[str]:
        return list(self.live[-1].argv) if self.live else []


class _ShutdownWatch:
    """A second QMP client on the VM's re-attach socket, waiting for SHUTDOWN.

    It only records QEMU's own timestamp of the event, so its own latency does
    not enter the measurement.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, path: Path) -> _ShutdownWatch:
        reader, writer = await asyncio.open_unix_connection(str(path))
        await reader.readline()
        writer.write(b'{"execute":"qmp_capabilities"}\n')
        await reader.readline()
        return cls(reader, writer)

    async def stamp(self) -> float | None:
        """QEMU's timestamp of SHUTDOWN, or ``None`` if the session ended without one."""
        try:
            while line := await asyncio.wait_for(self._reader.readline(), 5):
                msg = json.loads(line)
                if msg.get("event") == "SHUTDOWN":
                    ts = msg["timestamp"]
                    return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6
            return None
        finally:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
