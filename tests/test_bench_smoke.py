"""The benchmark suite runs end to end on tiny sizes, so it does not rot.

Numbers are not checked (speed is measured in bench/, not asserted in tests),
only that every benchmark produced them. libvirt is optional: when it is not
installed its parts must be skipped with a reason, never fail the run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: (benchmark, metric prefix, arms that must have numbers)
EXPECTED = [
    ("start", "request → running", ("vmdriver", "bare")),
    ("stop", "forced", ("vmdriver", "bare")),
    ("boot", "request → guest ready line", ("vmdriver", "vmdriver run", "bare")),
    ("stop", "graceful: request → exit reported", ("vmdriver", "vmdriver run", "bare")),
    ("stop", "graceful: guest power-off", ("vmdriver", "bare")),
    ("burst", "2 VMs at once", ("vmdriver", "bare")),
    ("burst", "supervisor PSS per VM", ("vmdriver", "bare")),
    ("stats", "sampling 2 VMs", ("vmdriver", "psutil (cpu_times+memory_info)", "bare")),
    ("scale", "start time, first VM", ("vmdriver", "bare")),
    ("scale", "supervisor PSS slope", ("vmdriver", "bare")),
]


@pytest.mark.e2e
def test_bench_suite_smoke(guest_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        (sys.executable, "-m", "bench", "--smoke", "--out", str(out)),
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert not [n for n in data["notes"] if "failed" in n], data["notes"]
    rows = {(r["bench"], r["metric"], r["arm"]): r["values"] for r in data["rows"]}
    for bench, prefix, arms in EXPECTED:
        for arm in arms:
            values = [v for (b, m, a), vs in rows.items() if b == bench and m.startswith(prefix)
                      and a == arm for v in vs]
            assert values, f"no {bench} / {prefix} numbers for {arm}"
            assert all(v is not None and math.isfinite(v) for v in values), (bench, prefix, arm, values)
    libvirt_rows = [k for k in rows if k[2] == "libvirt"]
    libvirt_skip = [s for s in data["skips"] if s.startswith("libvirt: skipped: ")]
    assert libvirt_rows or libvirt_skip, "libvirt neither measured nor skipped with a reason"
    if libvirt_skip:
        assert f"bench: {libvirt_skip[0]}" in proc.stdout  # the one-line reason is printed
    table = (out / "results.md").read_text()
    assert "| start | request → running | vmdriver |" in table
    assert data["host"]["qemu"] and data["host"]["cores"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert any(s.startswith("plot: skipped") for s in data["skips"])
    else:
        assert (out / "results.png").stat().st_size > 10_000
