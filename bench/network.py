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
import ipaddress
import json
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pyroute2.netns import popns, pushns  # type: ignore[import-untyped]

from vmdriver.network import HostNetwork, NetworkSettings, NicRequest, PortMap
from vmdriver.network.nft import chains

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
    ])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.network", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--burst", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the raw result as JSON")
    args = p.parse_args(argv)
    r = measure(args.rounds, args.burst)
    print(json.dumps(r, indent=1) if args.json else report(r))


if __name__ == "__main__":
    main()
