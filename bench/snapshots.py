"""Memory snapshots against cold boots of the same guest, in one run, as ratios.

    .venv/bin/python -m bench.snapshots [--rounds 3] [--clones 8] [--out bench/results]

Measured, each from the request to the supervisor until the guest answers HTTP
on its forwarded port (the same readiness for every arm):

* **cold boot**: the test guest booted from its disk (SeaBIOS, kernel, initrd);
* **from snapshot**: one clone of a snapshot of that guest taken once it was ready;
* **8 at once**: ``start_many`` of 8 clones until the last one answers;
* **save / restore throughput**: state file size over the save time (``migrate`` to
  the fd) and the load time (``migrate-incoming`` from the fd), with the guest's RAM;
* **migration**: live migration to a `vmdriver receive` in another process over a
  unix socket: total time and the guest's pause (downtime).

Writes ``snapshots.json`` and ``snapshots.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import GUEST, guest_ready, host_facts, make_overlay
from vmdriver.host.config import HostConfig
from vmdriver.runtime.livemigrate import migrate_recorded
from vmdriver.runtime.request import LaunchRequest
from vmdriver.runtime.snapshots import snapshot_recorded
from vmdriver.runtime.supervisor import Supervisor
from vmdriver.runtime.taskdir import TaskDir, VMDirs
from vmdriver.spec import Bus, Drive, FileMedium, PortForward, ShutdownPolicy, UserNic, VMSpec

MEMORY_MIB = 256
HTTP_PORT = 8080


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spec(name: str, port: int, snapshot: str | None = None) -> VMSpec:
    from vmdriver.spec import Resources

    return VMSpec(
        name=name, resources=Resources(memory_mib=MEMORY_MIB), vmgenid="auto", snapshot=snapshot,
        drives=(Drive(id="disk0", medium=FileMedium(path="local/disk.qcow2", format="qcow2"),
                      bus=Bus.VIRTIO),),
        nics=(UserNic(id="net0", forwards=(PortForward(label="http", host_port=port,
                                                       guest_port=HTTP_PORT),)),),
        shutdown=ShutdownPolicy(graceful=False, timeout_s=5), guest_agent=True)


def _request(host: HostConfig, vm_id: str, spec: VMSpec, disk: bool) -> LaunchRequest:
    name = vm_id.replace("/", "-")
    task = TaskDir(host.state_dir / "allocs" / name, spec.name)
    dirs = VMDirs.under(host.state_dir, vm_id, task)
    dirs.create()
    if disk:
        make_overlay(task.local / "disk.qcow2")
    return LaunchRequest(vm_id=vm_id, spec=spec, dirs=dirs)


async def _http_ready(port: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            try:
                resp = await client.get(f"http://127.0.0.1:{port}/", timeout=2)
                if resp.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.02)
    raise TimeoutError(f"no HTTP on port {port} within {timeout}s")


class _LoadTimes(logging.Handler):
    """The loader's own measure of migrate-incoming (its log line)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r"loaded in ([\d.]+)s", record.getMessage())
        if m:
            self.seconds.append(float(m.group(1)))


async def _cold(sup: Supervisor, host: HostConfig, i: int) -> tuple[float, str]:
    port = _port()
    t0 = time.monotonic()
    await sup.start(_request(host, f"cold{i}/vm", _spec("vm", port), True))
    await _http_ready(port)
    return time.monotonic() - t0, f"cold{i}/vm"


async def _clone(sup: Supervisor, host: HostConfig, vm_id: str) -> float:
    port = _port()
    t0 = time.monotonic()
    await sup.start(_request(host, vm_id, _spec("vm", port, "bench"), False))
    await _http_ready(port)
    return time.monotonic() - t0


async def _clones_alone(sup: Supervisor, host: HostConfig, source: str, rounds: int) -> list[float]:
    """Clones timed one at a time, each killed before the next, with the snapshot's source
    VM paused meanwhile: the conditions of the cold boots, which ran alone too. (Clones
    left running, as before, took their successors' CPU on 2 cores: 0.64 s against 0.3 s.)"""
    await sup.qmp(source, "stop")
    try:
        out = []
        for i in range(rounds):
            out.append(await _clone(sup, host, f"clone{i}/vm"))
            await sup.kill(f"clone{i}/vm")
        return out
    finally:
        await sup.qmp(source, "cont")


async def _many(sup: Supervisor, host: HostConfig, n: int) -> float:
    ports = [_port() for _ in range(n)]
    reqs = [_request(host, f"many{i}/vm", _spec("vm", p, "bench"), False)
            for i, p in enumerate(ports)]
    t0 = time.monotonic()
    await sup.start_many(reqs)
    await asyncio.gather(*(_http_ready(p) for p in ports))
    seconds = time.monotonic() - t0
    await asyncio.gather(*(sup.kill(r.vm_id) for r in reqs))
    return seconds


async def _migrate(sup: Supervisor, host: HostConfig, vm_id: str) -> dict[str, float]:
    sock = host.state_dir / "mig.sock"
    cfg = host.state_dir / "receiver.hcl"
    cfg.write_text(f'image_paths = ["{GUEST.resolve()}"]\nstate_dir = "{host.state_dir}"\n')
    proc = await asyncio.to_thread(
        subprocess.Popen, [sys.executable, "-m", "vmdriver.cli.main", "receive", "--listen",
                           f"unix:{sock}", "--host-config", str(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        await asyncio.to_thread(proc.stdout.readline)  # listening
        report = await migrate_recorded(sup.record(vm_id), host, f"unix:{sock}")
        port = int(re.findall(r"host:(\d+)", report.destination["forwards"][0])[0])
        await _http_ready(port)
        return {"total_s": report.total_s, "downtime_ms": report.downtime_ms,
                "ram_mib": report.ram_mib}
    finally:
        proc.terminate()
        proc.wait(60)
        if proc.stdout:
            proc.stdout.close()


async def run(rounds: int, clones: int) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="vmd-bsnap-", dir="/tmp"))
    host = HostConfig(state_dir=state, image_paths=(str(GUEST.resolve()),))
    sup = Supervisor(host)
    loads = _LoadTimes()
    logging.getLogger("vmdriver.runtime.stateload").addHandler(loads)
    logging.getLogger("vmdriver.runtime.stateload").setLevel(logging.INFO)
    out: dict[str, Any] = {"memory_mib": MEMORY_MIB, "rounds": rounds, "host": host_facts()}
    try:
        cold = []
        for i in range(rounds):
            seconds, vm_id = await _cold(sup, host, i)
            cold.append(seconds)
            if i < rounds - 1:
                await sup.kill(vm_id)
        meta = await snapshot_recorded(sup.record(vm_id), host, "bench")
        state_mib = (meta.state_size or 0) / (1 << 20)
        warm = await _clones_alone(sup, host, vm_id, rounds)
        many = await _many(sup, host, clones)
        out |= {
            "cold_boot_s": cold, "from_snapshot_s": warm,
            "ratio": statistics.median(cold) / statistics.median(warm),
            f"clones_{clones}_at_once_s": many, "state_mib": state_mib,
            "save_s": meta.save_seconds, "save_mib_s": state_mib / max(meta.save_seconds, 1e-6),
            "snapshot_pause_ms": meta.downtime_ms, "load_s": loads.seconds,
            "restore_mib_s": state_mib / statistics.median(loads.seconds) if loads.seconds else 0,
            "migration": await _migrate(sup, host, vm_id),
        }
    finally:
        await sup.kill_all()
        await sup.close()
        shutil.rmtree(state, ignore_errors=True)
    return out


def markdown(r: dict[str, Any], clones: int) -> str:
    med = statistics.median
    mig = r["migration"]
    rows = [
        ("request → HTTP, cold boot (median)", f"{med(r['cold_boot_s']):.2f} s"),
        ("request → HTTP, from snapshot (median)", f"{med(r['from_snapshot_s']):.3f} s"),
        ("**ratio cold / snapshot** (target ≥ 10x)", f"**{r['ratio']:.1f}x**"),
        (f"{clones} clones at once, request → all serve HTTP", f"{r[f'clones_{clones}_at_once_s']:.2f} s"),
        (f"save: {r['state_mib']:.1f} MiB state of {r['memory_mib']} MiB RAM",
         f"{r['save_s']:.3f} s, {r['save_mib_s']:.0f} MiB/s, guest paused {r['snapshot_pause_ms']} ms"),
        ("restore (migrate-incoming, median)",
         f"{med(r['load_s']) if r['load_s'] else 0:.3f} s, {r['restore_mib_s']:.0f} MiB/s"),
        ("live migration, unix socket, to another process",
         f"total {mig['total_s']:.2f} s, downtime {mig['downtime_ms']} ms, {mig['ram_mib']:.1f} MiB sent"),
    ]
    lines = ["# Snapshots vs cold boots", "",
             f"Test guest, TCG, {r['memory_mib']} MiB RAM, {r['rounds']} rounds; host "
             f"{r['host']['cpu']} ({r['host']['cores']} cores), QEMU {r['host']['qemu']}.", "",
             "| what | result |", "| --- | --- |"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    lines += ["", "Samples (s): cold " + ", ".join(f"{x:.2f}" for x in r["cold_boot_s"])
              + "; snapshot " + ", ".join(f"{x:.3f}" for x in r["from_snapshot_s"]), ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clones", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    why = guest_ready()
    if why:
        sys.stderr.write(f"bench.snapshots: skipped: {why}\n")
        return 0
    result = asyncio.run(run(args.rounds, args.clones))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "snapshots.json").write_text(json.dumps(result, indent=1))
    text = markdown(result, args.clones)
    (args.out / "snapshots.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
