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
JAILED, JAIL_OFF = "vmdriver (default jail)", "vmdriver, jail off"

#: (benchmark, metric prefix, arms that must have numbers): every case of the runner.
EXPECTED = [
    ("start", "request → running", ("vmdriver", "bare")),
    ("stop", "forced", ("vmdriver", "bare")),
    ("jail", "request → running", (JAILED, JAIL_OFF, "bare")),
    ("jail", "jail cost per start", (JAILED,)),
    ("jail", "2 VMs at once", (JAILED, JAIL_OFF, "bare")),
    ("boot", "request → guest ready line", ("vmdriver", "vmdriver run", "bare")),
    ("stop", "graceful: request → exit reported", ("vmdriver", "vmdriver run", "bare")),
    ("stop", "graceful: guest power-off", ("vmdriver", "bare")),
    ("burst", "2 VMs at once", ("vmdriver", "bare")),
    ("burst", "supervisor PSS per VM", ("vmdriver", "bare")),
    ("stats", "sampling 2 VMs", ("vmdriver", "psutil (cpu_times+memory_info)", "bare")),
    ("scale", "start time, first VM", ("vmdriver", "bare")),
    ("scale", "supervisor PSS slope", ("vmdriver", "bare")),
    ("network", "start: added by a tap", ("vmdriver",)),
    ("network", "VMs on one bridge at once", ("vmdriver",)),
    ("storage", "chained disk on a 10 GiB image", ("vmdriver",)),
    ("storage", "chained disk: 10 GiB image / 1 GiB image", ("vmdriver",)),
    ("storage", "full clone of a 8 MiB volume", ("vmdriver", "cp --reflink=auto")),
    ("storage", "full clone: speed", ("vmdriver",)),
    ("seed", "build a NoCloud seed (iso)", ("vmdriver",)),
    ("seed", "build a NoCloud seed (fat)", ("vmdriver",)),
    ("rbd", "chained disk, base exists", ("ceph rbd", "directory pool")),
    ("snapshots", "request → guest serves HTTP", ("cold boot", "from snapshot")),
    ("snapshots", "request → HTTP: cold boot / from snapshot", ("vmdriver",)),
    ("snapshots", "live migration (unix socket): downtime", ("vmdriver",)),
]
#: Cases that may be skipped with a one-line reason on a host that lacks what they need
#: (the same rule as libvirt): the throwaway Ceph cluster, a jail the probe allows.
MAY_SKIP = ("rbd", "jail")


def test_expected_covers_every_case() -> None:
    from bench.__main__ import BENCHES

    assert {b for b, _, _ in EXPECTED} - {"stop"} == set(BENCHES)


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
    skipped = {s.split(":", 1)[0] for s in data["skips"]}
    for bench, prefix, arms in EXPECTED:
        if bench in MAY_SKIP and bench in skipped:
            continue
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
    # Every case's target is in the verdicts, e.g. the jail case's two start ratios.
    assert "| seed | build a NoCloud seed (iso) | vmdriver: ≤ 20 ms |" in table
    assert data["host"]["load_during_run"].startswith("1-min avg")
    assert data["host"]["qemu"] and data["host"]["cores"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert any(s.startswith("plot: skipped") for s in data["skips"])
    else:
        assert (out / "results.png").stat().st_size > 10_000
