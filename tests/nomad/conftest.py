"""Fixtures of the Nomad plugin tests: plugin processes, allocations, task configs."""

from __future__ import annotations

import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.nomad.nomadsim import FifoReader, Plugin, cty_msgpack
from vmdriver.jobfile.dialects import DIALECTS
from vmdriver.nomad.hclspec import task_config_spec
from vmdriver.nomad.proto import driver_pb2 as pb

PLUGIN_ARGV = [sys.executable, "-m", "vmdriver.nomad"]


@dataclass
class Alloc:
    """One allocation's directories and log FIFOs, as Nomad's client lays them out."""

    root: Path
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    readers: list[FifoReader] = field(default_factory=list)

    def task(self, name: str, config: dict[str, Any], *, memory_mb: int = 256,
             ports: tuple[tuple[str, int, int], ...] = (), cpu_shares: int = 500,
             memory_limit_mb: int = 0) -> tuple[pb.TaskConfig, FifoReader]:
        """A TaskConfig like taskrunner builds it, with logmon reading the stdout FIFO."""
        (self.root / name / "local").mkdir(parents=True, exist_ok=True)
        logs = self.root / "alloc" / "logs"
        out = FifoReader(logs / f".{name}.stdout.fifo", logs / f"{name}.stdout.0")
        err = FifoReader(logs / f".{name}.stderr.fifo", logs / f"{name}.stderr.0")
        self.readers += [out, err]
        linux = pb.LinuxResources(
            cpu_shares=cpu_shares, memory_limit_bytes=(memory_limit_mb or memory_mb) << 20
        )
        res = pb.Resources(
            allocated_resources=pb.AllocatedTaskResources(
                cpu=pb.AllocatedCpuResources(cpu_shares=cpu_shares),
                memory=pb.AllocatedMemoryResources(memory_mb=memory_mb)),
            linux_resources=linux,
            ports=[pb.PortMapping(label=lbl, value=v, to=to) for lbl, v, to in ports],
        )
        cfg = pb.TaskConfig(
            id=f"{self.id}/{name}/{uuid.uuid4().hex[:8]}", name=name, alloc_id=self.id,
            job_name="vmjob", job_id="vmjob", task_group_name="vms", namespace="default",
            env={"NOMAD_TASK_NAME": name, "NOMAD_ALLOC_ID": self.id},
            resources=res, alloc_dir=str(self.root),
            stdout_path=str(out.fifo), stderr_path=str(err.fifo),
            msgpack_driver_config=cty_msgpack(config, task_config_spec(DIALECTS["qemu"])),
        )
        return cfg, out

    def close(self) -> None:
        """Stop the log readers."""
        for r in self.readers:
            r.close()


@pytest.fixture
def alloc() -> Iterator[Alloc]:
    """A fresh allocation dir (short path: QMP socket paths must fit in 108 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="nal-", dir="/tmp"))
    a = Alloc(root)
    try:
        yield a
    finally:
        a.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def start_plugin(state_dir: Path) -> Iterator[Callable[..., Plugin]]:
    """Start configured plugin processes; every one is shut down at the end."""
    started: list[Plugin] = []

    def start(argv: list[str] | None = None, configure: bool = True) -> Plugin:
        plugin = Plugin(argv or PLUGIN_ARGV)
        started.append(plugin)
        if configure:
            plugin.configure({"state_dir": str(state_dir)})
        return plugin

    yield start
    for plugin in started:
        plugin.close()
