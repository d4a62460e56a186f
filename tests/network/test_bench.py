"""bench/network.py runs and cleans up after itself (a small run, so it does not rot)."""

from __future__ import annotations

import subprocess

from bench.network import measure, measure_start, report


def test_bench_network_small_run() -> None:
    r = measure(rounds=2, burst=3)
    assert r["burst"] == 3 and len(r["samples"]["burst_setup"]) == 3
    assert 0 < r["setup_median_ms"] < 1000 and 0 < r["teardown_median_ms"] < 1000
    # 3 VMs: dnat + local + spoof each, the network's two chains, localhost-snat.
    assert r["chains_at_peak"] == 3 * 3 + 3
    assert "| VM network set-up" in report(r)
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert "vmdbench" not in after, "the benchmark's namespace was left behind"


def test_bench_start_against_user_networking() -> None:
    st = measure_start(rounds=1)
    assert 0 < st["user_ms"] < 30000 and 0 < st["tap_ms"] < 30000
    assert st["added_ms"] == st["tap_ms"] - st["user_ms"]
