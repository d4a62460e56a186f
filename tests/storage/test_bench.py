"""bench/storage.py runs and reports what it promises (tiny sizes: the numbers are the bench's job)."""

from __future__ import annotations

from bench.storage import chained_create, full_clone


def test_bench_functions_report_medians_and_ratios() -> None:
    got = chained_create(rounds=2, data=4 << 20)
    assert set(got) >= {"median_ms_1GiB", "median_ms_10GiB", "ratio_10GiB_vs_1GiB",
                        "first_ms_10GiB"}
    assert got["ratio_10GiB_vs_1GiB"] > 0
    clone = full_clone(rounds=1, size=8 << 20)
    assert clone["speed_ratio_vs_cp"] > 0 and clone["size_MiB"] == 8
