"""Golden-file tests: one job file (or spec) in, one QEMU argv out.

Regenerate after an intended change with ``pytest --regen-golden`` and review
the diff of tests/golden/*.argv like any other change. A golden file that is
missing is a failure, never written silently.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from vmdriver.jobfile.model import load_job
from vmdriver.jobfile.plan import plan_job
from vmdriver.qemu.argv import DriveSource, NicFds, RenderContext, render_argv
from vmdriver.runtime.taskdir import VMDirs
from vmdriver.spec import FileMedium, MacvtapNic, TapNic, VMSpec

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
JOBS = sorted(GOLDEN.glob("*.hcl"))
SPECS = sorted(GOLDEN.glob("*.spec.json"))


def context(spec: VMSpec, dirs: VMDirs) -> RenderContext:
    """A fixed host context: images as fd sets 3+, taps as fds 40+."""
    drives = {}
    fds = itertools.count(10)
    for i, d in enumerate(spec.drives):
        if isinstance(d.medium, FileMedium):
            fmt = d.medium.format or ("qcow2" if d.medium.path.endswith("qcow2") else "raw")
            own = (next(fds),) if not d.writable else (next(fds), next(fds))
            drives[d.id] = DriveSource(f"/dev/fdset/{i + 1}", fmt, own, i + 1)
    taps = {n.id: NicFds(40 + i) for i, n in enumerate(spec.nics)
            if isinstance(n, TapNic | MacvtapNic)}
    return RenderContext(
        binary=Path(f"/usr/bin/qemu-system-{spec.emulator.removeprefix('qemu-system-')}"),
        accelerator="kvm" if spec.accelerator.value == "kvm" else "tcg",
        runtime_dir=dirs.runtime, qmp_socket=dirs.qmp_socket, qga_socket=dirs.qga_socket,
        drives=drives, nic_fds=taps, share_paths={s.tag: f"/srv/{s.tag}" for s in spec.shares},
        qmp_fd=3, sandbox=True, spice=True,
    )


def render_job(job_path: Path) -> str:
    """Render every task of a job with a fixed host context."""
    counter = itertools.count()
    plans = plan_job(load_job(job_path), Path("/state"), host_memory_mb=65536,
                     new_alloc_id=lambda: f"0000000{next(counter)}-alloc", check_ports=False)
    out = []
    for plan in plans:
        dirs = VMDirs.under(Path("/state"), plan.vm_id, plan.task_dir)
        argv = render_argv(plan.spec, context(plan.spec, dirs))
        out.append(f"# task {plan.task.name}\n" + "\n".join(argv) + "\n")
    return "".join(out)


def render_spec(path: Path) -> str:
    """Render a spec given as JSON (the faces' common output)."""
    spec = VMSpec.model_validate_json(path.read_text())
    from vmdriver.runtime.taskdir import TaskDir

    dirs = VMDirs.under(Path("/state"), spec.name, TaskDir(Path("/state/allocs/x"), spec.name))
    return "\n".join(render_argv(spec, context(spec, dirs))) + "\n"


def _check(got: str, golden: Path, request: pytest.FixtureRequest) -> None:
    if request.config.getoption("--regen-golden"):
        golden.write_text(got)
    assert golden.exists(), f"{golden.name} is missing; create it with --regen-golden and review it"
    assert got == golden.read_text(), f"argv of {golden.stem} changed; rerun with --regen-golden"


@pytest.mark.parametrize("job", JOBS, ids=[j.stem for j in JOBS])
def test_golden_job_argv(job: Path, request: pytest.FixtureRequest) -> None:
    _check(render_job(job), job.with_suffix(".argv"), request)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name.removesuffix(".spec.json") for s in SPECS])
def test_golden_spec_argv(spec: Path, request: pytest.FixtureRequest) -> None:
    _check(render_spec(spec), spec.with_name(spec.name.removesuffix(".spec.json") + ".argv"), request)


def test_golden_cases_exist() -> None:
    # The reshaped core's cases: many drives with an empty tray, two NICs, UEFI + TPM.
    names = {s.name.removesuffix(".spec.json") for s in SPECS}
    assert {"three-disks", "two-nics", "uefi-tpm"} <= names
    assert len(JOBS) >= 4
