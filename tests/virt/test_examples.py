"""nomad-driver-virt's README examples (seed 003), adapted to local images, as shipped in examples/.

Every example plans (`vmdriver argv`); the storage ones run with `vmdriver run`
on the test guest until it is ready, and leave only the operator's golden
volume behind. The network examples need host interfaces (virbr0, eth0) this
test may not touch; they are checked by planning.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.virt.helpers import VMDRIVER, bases, host_file, running, volumes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GOLDEN = "test-guest.qcow2"
#: Example → the volumes its task has while it runs (besides the golden one).
STORAGE = {"virt-storage.nomad.hcl": 2, "virt-clone.nomad.hcl": 1,
           "virt-chained-volume.nomad.hcl": 1, "virt-chained-image.nomad.hcl": 1}


@pytest.fixture
def place(guest_dir: Path) -> Iterator[tuple[Path, Path]]:
    state = Path(tempfile.mkdtemp(prefix="vte-", dir="/tmp"))
    try:
        pool = state / "pool"
        pool.mkdir()
        shutil.copyfile(guest_dir / "disk.qcow2", pool / GOLDEN)
        yield state, host_file(state, pool, (guest_dir,))
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_every_virt_example_plans(place: tuple[Path, Path]) -> None:
    state, host = place
    examples = sorted(EXAMPLES.glob("virt-*.nomad.hcl"))
    assert len(examples) == 6
    for job in examples:
        out = subprocess.run((VMDRIVER, "argv", str(job), "--host-config", str(host),
                              "--state-dir", str(state / "s")),
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, f"{job.name}: {out.stderr}"
        assert "qemu-system-x86_64" in out.stdout
        # The disks as provisioning will make them (nothing made), and the seed.
        assert "-virt-task-0.qcow2" in out.stdout and "cidata.iso" in out.stdout, job.name
    assert volumes(state / "pool") == [GOLDEN]


@pytest.mark.parametrize("example", sorted(STORAGE))
def test_storage_example_runs(place: tuple[Path, Path], example: str) -> None:
    state, host = place
    pool = state / "pool"
    with running(EXAMPLES / example, host, state / "s") as run:
        run.wait_for("ready", 240)
        made = [v for v in volumes(pool) if v != GOLDEN]
        assert len(made) == STORAGE[example], made
        assert all("-virt-task-" in v for v in made)
        assert run.stop() == 0, "".join(run.stderr)
    assert volumes(pool) == [GOLDEN]
    assert bases(pool) == []
