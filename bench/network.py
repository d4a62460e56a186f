"""What vmdriver's networking adds to a VM's start and stop: ``python -m bench.network``.

Set-up is what the runtime does before QEMU starts on a managed network:
create the tap, attach it to the bridge, install the MAC guard (``attach``), and
publish three ports over TCP+UDP (``publish``). Teardown is ``detach`` with the
tap's fd closed first, as when QEMU exits (timed apart: the kernel waits for an
RCU grace period there). The burst's teardown detaches with the taps still open.
User-mode networking adds nothing on the host side (slirp runs inside QEMU), so
these numbers are the difference a tap NIC makes to a start. Everything runs in
a network namespace this creates.

Prints medians in ms; ``--json`` prints the raw samples too.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyroute2.netns import popns, pushns  # type: ignore[import-untyped]

from bench.common import REPO, tiny_spec
from bench.results import Target, add_target, at_most
from vmdriver.host.config import HostConfig
from vmdriver.network import HostNetwork, NetworkSettings, NicRequest, PortMap
from vmdriver.network.nft import chains
from vmdriver.runtime.request import LaunchRequest
from vmdriver.runtime.supervisor import Supervisor
from vmdriver.runtime.taskdir import TaskDir, VMDirs
from vmdriver.spec import PortForward, TapNic, UserNic
from vmdriver.spec.devices import Nic

if TYPE_CHECKING:
    from bench.cases import Env

TARGET_MS = 30.0
_PORTS = [PortMap(20080, 8080), PortMap(20443, 443)]


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def _one(hn: HostNetwork, vm_id: str, n: int) -> tuple[float, Any]:
    t0 = time.perf_counter()
    vmnet = hn.attach(vm_id, [NicRequest(0, "tap", bridge="vmdbr0")])
    guest = ipaddress.ip_address(f"10.218.{n // 250}.{n % 250 + 2}")
    hn.publish(vm_id, [*_PORTS, PortMap(21000 + n, 22)], [guest])
    return _ms(t0), vmnet


def measure(rounds: int = 20, burst: int = 32) -> dict[str, Any]:
    """Median set-up/teardown per VM, alone and as ``burst`` VMs in a row (in a fresh namespace)."""
    ns = f"vmdbench{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    state = Path(tempfile.mkdtemp(prefix="vmdnb-", dir="/tmp"))
    hn = HostNetwork(NetworkSettings.model_validate(
        {"networks": {"bench": {"bridge": "vmdbr0", "subnet": "10.218.0.0/16"}}}), state)
    pushns(ns)
    try:
        net = hn.settings.networks["bench"]
        t0 = time.perf_counter()
        hn.ensure_network(net)
        network_ms = _ms(t0)
        _one(hn, "warm-up", 0)[1].close_fds()  # imports, first netlink/nft contexts
        hn.detach("warm-up")
        setup, teardown, tap_close = [], [], []
        for i in range(rounds):
            ms, vmnet = _one(hn, f"single-{i}", i)
            setup.append(ms)
            t0 = time.perf_counter()
            vmnet.close_fds()  # what QEMU's exit does: the kernel deletes the tap
            tap_close.append(_ms(t0))
            t0 = time.perf_counter()
            hn.detach(f"single-{i}", vmnet)
            teardown.append(_ms(t0))
        burst_setup, nets = [], []
        t_all = time.perf_counter()
        for i in range(burst):
            ms, vmnet = _one(hn, f"burst-{i}", i)
            burst_setup.append(ms)
            nets.append(vmnet)
        burst_total = _ms(t_all)
        n_chains = len(chains())
        burst_teardown = []
        for i, vmnet in enumerate(nets):
            t0 = time.perf_counter()
            hn.detach(f"burst-{i}", vmnet)
            burst_teardown.append(_ms(t0))
        hn.remove_network(net)
    finally:
        popns()
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(state, ignore_errors=True)
    med = statistics.median
    return {
        "network_setup_ms": network_ms,
        "setup_median_ms": med(setup), "teardown_median_ms": med(teardown),
        "tap_close_median_ms": med(tap_close),
        "burst": burst, "burst_setup_median_ms": med(burst_setup),
        "burst_setup_last_ms": burst_setup[-1], "burst_total_ms": burst_total,
        "burst_teardown_median_ms": med(burst_teardown), "chains_at_peak": n_chains,
        "target_ms": TARGET_MS,
        "samples": {"setup": setup, "teardown": teardown, "tap_close": tap_close,
                    "burst_setup": burst_setup,
                    "burst_teardown": burst_teardown},
    }


def _qmp_ready(path: Path, deadline: float) -> None:
    """Wait until QEMU answers qmp_capabilities on ``path``."""
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                f = s.makefile("rwb")
                f.readline()  # greeting
                f.write(b'{"execute": "qmp_capabilities"}\n')
                f.flush()
                if b"return" in f.readline():
                    return
        except OSError:
            time.sleep(0.002)
    raise TimeoutError("QEMU's QMP did not answer")


def _start_once(hn: HostNetwork | None, work: Path, i: int) -> float:
    """ms from deciding to start to QEMU answering QMP (paused, -S), one NIC."""
    sock = work / f"qmp{i}.sock"
    argv = ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "128", "-nodefaults", "-S",
            "-display", "none", "-qmp", f"unix:{sock},server=on,wait=off"]
    t0 = time.perf_counter()
    vmnet = None
    if hn is None:
        argv += ["-netdev", "user,id=n0"]
    else:
        vmnet = hn.attach(f"start-{i}", [NicRequest(0, "tap", bridge="vmdbr0")])
        argv += ["-netdev", vmnet.netdev_args()[0]]
    argv += ["-device", "virtio-net-pci,netdev=n0" if hn is None else "virtio-net-pci,netdev=net0"]
    proc = subprocess.Popen(argv, pass_fds=vmnet.pass_fds() if vmnet else (),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if vmnet is not None:
        vmnet.close_fds()
    try:
        _qmp_ready(sock, time.monotonic() + 30)
        return _ms(t0)
    finally:
        proc.kill()
        proc.wait()
        if hn is not None:
            hn.detach(f"start-{i}", vmnet)


def measure_start(rounds: int = 8) -> dict[str, Any]:
    """QEMU start to QMP with user-mode networking vs a tap on a managed bridge, interleaved."""
    ns = f"vmdbench{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    work = Path(tempfile.mkdtemp(prefix="vmdnb-", dir="/tmp"))
    hn = HostNetwork(NetworkSettings.model_validate(
        {"networks": {"bench": {"bridge": "vmdbr0", "subnet": "10.218.0.0/16"}}}), work)
    user, tap = [], []
    pushns(ns)
    try:
        hn.ensure_network(hn.settings.networks["bench"])
        _start_once(hn, work, 999)  # warm-up: page cache, first netlink/nft contexts
        for i in range(rounds):
            user.append(_start_once(None, work, 2 * i))
            tap.append(_start_once(hn, work, 2 * i + 1))
    finally:
        popns()
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    return {"user_ms": med(user), "tap_ms": med(tap), "added_ms": med(tap) - med(user),
            "samples": {"user": user, "tap": tap}}


# --- through vmdriver's supervisor --------------------------------------------------------

_NET = {"bench": {"bridge": "vmdbr0", "subnet": "10.218.0.0/16"}}
#: No NIC boot ROM: SeaBIOS would run iPXE (DHCP, under TCG seconds of CPU per VM)
#: in the VMs started first while the burst's later ones start; the arms compare
#: vmdriver's work, the guests idle as in the burst case.
_NO_ROM = ("-nodefaults", "-global", "virtio-net-pci.romfile=")


def _nic(kind: str, i: int) -> Nic:
    if kind == "user":
        return UserNic(id="net0")
    return TapNic(id="net0", bridge="vmdbr0",
                  forwards=(PortForward(label="http", host_port=20000 + i, guest_port=80),))


async def _start_all(sup: Supervisor, state: Path, kind: str, ids: list[int]) -> float:
    """ms from asking for the VMs (at once, as the burst case does) to all running."""
    reqs = []
    for i in ids:
        vm_id = f"{kind[0]}{i}"
        dirs = VMDirs.under(state, vm_id, TaskDir(state / f"a-{vm_id}", "t"))
        spec = tiny_spec("t").model_copy(update={"nics": (_nic(kind, i),), "args": _NO_ROM})
        reqs.append(LaunchRequest(vm_id=vm_id, spec=spec, dirs=dirs))
    t0 = time.perf_counter()
    infos = await asyncio.gather(*(sup.start(r) for r in reqs))
    ms = _ms(t0)
    await asyncio.gather(*(sup.kill(i.id) for i in infos))
    for info in infos:
        await sup.destroy(info.id)
    return ms


async def _supervised(rounds: int, burst: int, burst_rounds: int, state: Path
                      ) -> dict[str, list[float]]:
    """Inside the namespace: single starts and bursts, user-mode vs tap, interleaved."""
    # No jail: this compares NIC kinds, and the jail's own cost is another benchmark's.
    jail = {"jail": "off"} if "jail" in HostConfig.model_fields else {}
    sup = Supervisor(HostConfig.model_validate({"state_dir": state, "network": _NET, **jail,
                                                "args_allowlist": ["-nodefaults", "-global"]}))
    out: dict[str, list[float]] = {"user": [], "tap": [], "burst_user": [], "burst_tap": [],
                                   "attach": []}
    try:
        for kind in ("user", "tap"):  # warm-up: imports, the bridge, dnsmasq, first contexts
            await _start_all(sup, state, kind, [9999])
        n = 0
        for i in range(rounds):
            for kind in (("user", "tap") if i % 2 == 0 else ("tap", "user")):
                n += 1
                out[kind].append(await _start_all(sup, state, kind, [n]))
        for i in range(rounds):  # the host side alone: what a tap start adds before QEMU
            spec = tiny_spec("t").model_copy(update={"nics": (_nic("tap", i),)})
            t0 = time.perf_counter()
            _, fds = await sup.networks.attach(f"x{i}", spec)
            out["attach"].append(_ms(t0))
            for f in fds.values():
                os.close(f.tap)
            await sup.networks.detach(f"x{i}", None)
        for i in range(burst_rounds):
            for kind in (("user", "tap") if i % 2 == 0 else ("tap", "user")):
                ids = list(range(n + 1, n + 1 + burst))
                n += burst
                out[f"burst_{kind}"].append(await _start_all(sup, state, kind, ids))
    finally:
        await sup.close()
    return out


def measure_supervised(rounds: int = 8, burst: int = 32, burst_rounds: int = 3
                       ) -> dict[str, list[float]]:
    """VM start through vmdriver's Supervisor with a user-mode NIC vs a tap on a managed
    bridge, one at a time and ``burst`` at once; run in a namespace this creates."""
    ns = f"vmdbench{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    state = Path(tempfile.mkdtemp(prefix="vmdnb-", dir="/tmp"))
    try:
        # The supervisor's networking acts in its threads' namespace: run it all in there.
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.network", "--inner",
             json.dumps([rounds, burst, burst_rounds, str(state)])],
            cwd=REPO, check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"supervised network bench failed: {proc.stderr.strip()[-300:]}")
        samples: dict[str, list[float]] = json.loads(proc.stdout.splitlines()[-1])
        return samples
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(state, ignore_errors=True)


def added_by_tap(samples: dict[str, list[float]]) -> tuple[list[float], list[float]]:
    """Per round: ms a tap adds to a start, and a tap burst's wall time over a user-mode one's."""
    added = [t - u for u, t in zip(samples["user"], samples["tap"], strict=True)]
    ratio = [t / u for u, t in zip(samples["burst_user"], samples["burst_tap"], strict=True)]
    return added, ratio


#: Metrics of the ``network`` case of ``python -m bench`` and their targets (issue 13).
ADDED_METRIC = "start: added by a tap on a managed bridge (tap minus user-mode, per round)"
BURST_METRIC = "VMs on one bridge at once: wall time / the same burst with user-mode NICs"
BURST_TARGET = 1.3  # the burst case's target, against user-mode NICs as the floor
add_target("network", ADDED_METRIC, Target(f"≤ {TARGET_MS:.0f} ms", at_most(TARGET_MS)))
add_target("network", BURST_METRIC, Target(f"≤ {BURST_TARGET}x", at_most(BURST_TARGET)))


async def bench_network(env: Env) -> None:
    """network: what a tap NIC adds to a VM's start through vmdriver, alone and in a burst."""
    from bench.cases import progress

    s, r = env.sizes, env.results
    rounds, burst_rounds = min(s.start_rounds, 10), min(s.burst_rounds, 3)
    progress(f"network: {rounds} starts per NIC kind, {burst_rounds} bursts of {s.burst_n}")
    samples = await asyncio.to_thread(measure_supervised, rounds, s.burst_n, burst_rounds)
    added, ratio = added_by_tap(samples)
    for label, key in (("start, user-mode NIC", "user"), ("start, tap on a managed bridge", "tap"),
                       ("tap set-up in the start path (Networks.attach)", "attach"),
                       (f"{s.burst_n} VMs at once, user-mode NICs", "burst_user"),
                       (f"{s.burst_n} VMs at once, taps on one bridge", "burst_tap")):
        for v in samples[key]:
            r.add("network", label, "vmdriver", v, "ms")
    for v in added:
        r.add("network", ADDED_METRIC, "vmdriver", v, "ms")
    for v in ratio:
        r.add("network", BURST_METRIC, "vmdriver", v, "x")


def report(r: dict[str, Any]) -> str:
    ok = "within" if r["setup_median_ms"] <= r["target_ms"] else "OVER"
    return "\n".join([
        "| measure | median ms |", "| --- | ---: |",
        f"| managed network set-up (bridge, addresses, NAT), once | {r['network_setup_ms']:.1f} |",
        f"| VM network set-up (tap + bridge + guard + 3 ports) | {r['setup_median_ms']:.1f} |",
        f"| tap fd closed (QEMU exits; the kernel deletes the tap) | {r['tap_close_median_ms']:.1f} |",
        f"| VM network teardown after that (`detach`: chains) | {r['teardown_median_ms']:.1f} |",
        f"| set-up, {r['burst']} VMs in a row (median / last) | "
        f"{r['burst_setup_median_ms']:.1f} / {r['burst_setup_last_ms']:.1f} |",
        f"| {r['burst']} set-ups in a row, total | {r['burst_total_ms']:.0f} |",
        f"| teardown with the tap still open, {r['burst']} VMs in a row | "
        f"{r['burst_teardown_median_ms']:.1f} |",
        "",
        f"Set-up median is {ok} the {r['target_ms']:.0f} ms target; {r['chains_at_peak']} chains "
        f"with {r['burst']} VMs.",
        *_start_report(r.get("start")),
    ])


def _start_report(st: dict[str, Any] | None) -> list[str]:
    if not st:
        return []
    return ["", "| QEMU start to QMP (paused, TCG), one NIC | median ms |", "| --- | ---: |",
            f"| user-mode networking | {st['user_ms']:.1f} |",
            f"| tap on a managed bridge (incl. attach) | {st['tap_ms']:.1f} |",
            f"| added by the tap | {st['added_ms']:.1f} |"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.network", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--burst", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the raw result as JSON")
    p.add_argument("--start-rounds", type=int, default=8,
                   help="QEMU starts per arm (user-mode vs tap); 0 skips them")
    p.add_argument("--inner", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner:
        rounds, burst, burst_rounds, state = json.loads(args.inner)
        print(json.dumps(asyncio.run(_supervised(rounds, burst, burst_rounds, Path(state)))))
        return
    r = measure(args.rounds, args.burst)
    if args.start_rounds:
        r["start"] = measure_start(args.start_rounds)
    print(json.dumps(r, indent=1) if args.json else report(r))


if __name__ == "__main__":
    main()
