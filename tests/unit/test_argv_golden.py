"""Golden-file tests: one job file in, one QEMU argv out.

Regenerate after an intended change with ``pytest --regen-golden`` and review
the diff of tests/golden/*.argv like any other change.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from vmdriver.jobfile.model import load_job
from vmdriver.jobfile.plan import plan_job
from vmdriver.qemu.argv import RenderContext, render_argv

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
JOBS = sorted(GOLDEN.glob("*.hcl"))


def render(job_path: Path) -> str:
    """Render every task of a job with a fixed host context."""
    counter = itertools.count()
    plans = plan_job(load_job(job_path), Path("/state"), host_memory_mb=65536,
                     new_alloc_id=lambda: f"0000000{next(counter)}-alloc", check_ports=False)
    out = []
    for plan in plans:
        ctx = RenderContext(
            binary=Path(f"/usr/bin/qemu-system-{plan.spec.emulator.removeprefix('qemu-system-')}"),
            accelerator="tcg" if plan.spec.accelerator.value != "kvm" else "kvm",
            qmp_socket=plan.task_dir.qmp_socket,
            qga_socket=plan.task_dir.qga_socket,
            drive_paths=tuple(str(plan.task_dir.path / d.path) for d in plan.spec.drives),
            drive_formats=tuple("qcow2" if d.path.endswith("qcow2") else "raw"
                                for d in plan.spec.drives),
            qmp_fd=3,
            sandbox=True,
        )
        out.append(f"# task {plan.task.name}\n" + "\n".join(render_argv(plan.spec, ctx)) + "\n")
    return "".join(out)


@pytest.mark.parametrize("job", JOBS, ids=[j.stem for j in JOBS])
def test_golden_argv(job: Path, request: pytest.FixtureRequest) -> None:
    got = render(job)
    golden = job.with_suffix(".argv")
    if request.config.getoption("--regen-golden") or not golden.exists():
        golden.write_text(got)
    assert got == golden.read_text(), f"argv of {job.name} changed; rerun with --regen-golden"


def test_golden_files_all_checked_in() -> None:
    # A job without its golden file would silently pass by writing one.
    assert all(j.with_suffix(".argv").exists() for j in JOBS)
