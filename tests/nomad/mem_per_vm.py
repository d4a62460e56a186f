"""Measure the plugin process's memory per managed VM (not a test; run by hand or from bench/).

    .venv/bin/python -m tests.nomad.mem_per_vm [N]

Starts the plugin as Nomad would, then N cheap VMs (no guest OS: a blank raw
disk, ``-nodefaults``, 128 MiB, TCG) with a WaitTask and a TaskStats stream held
open for each, as Nomad's task runner does, and prints the plugin's USS/PSS/RSS
with 1 VM and with N VMs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
from google.protobuf import duration_pb2

from tests.nomad.conftest import PLUGIN_ARGV, Alloc
from tests.nomad.nomadsim import Plugin
from vmdriver.nomad.proto import driver_pb2 as pb


def _mem(pid: int) -> dict[str, float]:
    info = psutil.Process(pid).memory_full_info()
    return {k: round(getattr(info, k) / 2**20, 2) for k in ("uss", "pss", "rss")}


def _drain(stream: Iterator[object]) -> None:
    with contextlib.suppress(grpc.RpcError):
        for _ in stream:
            pass


def main(n: int = 16) -> dict[str, object]:
    state = Path(tempfile.mkdtemp(prefix="vmd-mem-", dir="/tmp"))
    plugin = Plugin(PLUGIN_ARGV)
    plugin.configure({"state_dir": str(state)})
    allocs: list[Alloc] = []
    tasks: list[str] = []
    streams = []
    points: dict[int, dict[str, float]] = {}
    try:
        for i in range(n):
            alloc = Alloc(Path(tempfile.mkdtemp(prefix="vm-", dir="/tmp")))
            allocs.append(alloc)
            local = alloc.root / "t" / "local"
            local.mkdir(parents=True)
            (local / "blank.img").write_bytes(b"\0" * 1024 * 1024)
            cfg = {"image_path": "local/blank.img", "args": ["-nodefaults"]}
            task, _ = alloc.task("t", cfg, memory_mb=128)
            plugin.driver.StartTask(pb.StartTaskRequest(task=task), timeout=60)
            tasks.append(task.id)
            wait = plugin.driver.WaitTask.future(pb.WaitTaskRequest(task_id=task.id))
            stats = plugin.driver.TaskStats(
                pb.TaskStatsRequest(task_id=task.id, collection_interval=duration_pb2.Duration(seconds=1))
            )
            threading.Thread(target=_drain, args=(stats,), daemon=True).start()
            streams += [wait, stats]
            if i + 1 in (1, n):
                time.sleep(3)  # let stats streams run a few rounds
                points[i + 1] = _mem(plugin.proc.pid)
        per_vm = {k: round((points[n][k] - points[1][k]) / (n - 1), 3) for k in points[1]}
        return {"vms": n, "at_1": points[1], f"at_{n}": points[n], "per_vm_mib": per_vm}
    finally:
        for s in streams:
            s.cancel()
        for tid in tasks:
            t0 = time.monotonic()
            try:
                plugin.driver.DestroyTask(pb.DestroyTaskRequest(task_id=tid, force=True), timeout=30)
            except grpc.RpcError as exc:
                print("destroy failed", exc.code(), time.monotonic() - t0, file=sys.stderr)
                print(plugin.stderr()[-3000:], file=sys.stderr)
                raise
        plugin.close()
        for alloc in allocs:
            alloc.close()
            shutil.rmtree(alloc.root, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 16), indent=2))
