"""Issue 17 end to end: a virt job on a ceph pool under `vmdriver run`, on the real test cluster.

One boot of the test guest serves the module. Its host config holds only a ceph
pool (the cluster's pool ``vmd``, user ``client.vmd``); the job has four disks:

* ``vmd-root``: primary, chained on the guest's disk.raw (a raw RBD clone), grown;
* ``vmd-data``: an empty RBD volume the guest writes to through its agent;
* ``vmd-twin``: a second chained disk of the same image, so two clones share a base;
* ``vmd-ro``: an empty ``read_only`` RBD volume the guest must not change.

QEMU runs in its jail (the host default): the key file is its uid's, and the
jail keeps the host network to reach the monitors. While it runs, the pool is
read with the bindings, and every process's argv, the VM record and every file
of the state dir are searched for the key. The guest is stopped with `vmdriver
stop` (the run keeps its volumes), the data disk's bytes are read back from RBD,
and the task is destroyed as DestroyTask does (the face's ``release``): the pool
must be as it was before the run.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.ceph.cluster import Cluster, free_port, gen_key
from tests.storage_rbd.conftest import FULL_POOL, MIB, pool_state, read_image
from tests.virt.helpers import VMDRIVER, Run, agent_sh, job_file, running
from vmdriver.host.config import load_host_config
from vmdriver.jobfile.virt import release
from vmdriver.storage.rbd import RbdPool
from vmdriver.storage.rbd_ops import BASE_SNAP, bindings, is_base

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

RBD_MODULE = Path("/usr/lib/x86_64-linux-gnu/qemu/block-rbd.so")
PATTERN = b"written-by-the-guest-onto-rbd\n" * 64
DISKS = """
disk {
  primary = true
  chained = true
  size    = "128MiB"
  devname = "vmd-root"
  source {
    image = "GUEST/disk.raw"
  }
}
disk {
  size    = "16MiB"
  devname = "vmd-data"
}
disk {
  chained = true
  devname = "vmd-twin"
  source {
    image = "GUEST/disk.raw"
  }
}
disk {
  size      = "4MiB"
  read_only = true
  devname   = "vmd-ro"
}
"""


def host_file(directory: Path, cl: Cluster, *, hosts: str = "", user: str = "",
              key: str = "", guest: Path | None = None, full: RbdPool | None = None) -> Path:
    """A host config whose pool is the cluster's (parts overridable for failures).

    ``full``: a second ceph pool ``full`` (the default stays ``remote``).
    """
    path = directory / "host.hcl"
    second = "" if full is None else f"""
  default = "remote"
  ceph "full" {{
    pool  = "{full.config.pool}"
    hosts = ["{cl.mon_host}"]
    authentication {{
      username = "{full.user}"
      secret   = "{full.config.authentication.secret.get_secret_value()}"
    }}
  }}"""
    path.write_text(f"""
image_paths      = [{f'"{guest}"' if guest else ""}]
virt_accelerator = "tcg"
storage_pools {{{second}
  ceph "remote" {{
    pool  = "{cl.pool}"
    hosts = ["{hosts or cl.mon_host}"]
    authentication {{
      username = "{user or cl.client}"
      secret   = "{key or cl.client_key}"
    }}
  }}
}}
""")
    path.chmod(0o600)
    return path


@dataclass
class Booted:
    run: Run
    cluster: Cluster
    before: dict[str, list[str]]
    qga: Path
    boot_s: float
    #: The volumes' names, by disk index, while the VM runs.
    volumes: list[str]


def task_volumes(admin: Any, pool: str) -> list[str]:
    return sorted(n for n in pool_state(admin, pool) if "-vm-" in n)


@pytest.fixture(scope="module")
def booted(ceph_cluster: Cluster, admin: Any, guest_dir: Path) -> Iterator[Booted]:
    if not RBD_MODULE.exists():
        pytest.skip("QEMU's rbd block driver is missing (Debian package qemu-block-extra)")
    tmp = Path(tempfile.mkdtemp(prefix="vrr-", dir="/tmp"))
    host = host_file(tmp, ceph_cluster, guest=guest_dir)
    before = pool_state(admin, ceph_cluster.pool)
    try:
        state = tmp / "state"
        job = job_file(tmp, DISKS.replace("GUEST", str(guest_dir)))
        with running(job, host, state, "--keep-volumes") as run:
            t0 = time.monotonic()
            run.wait_for("ready", 300)
            boot_s = time.monotonic() - t0
            print(f"\nvirt job on a ceph pool: guest ready {boot_s:.1f}s after `vmdriver run`")
            (qga,) = state.glob("run/*/*/qga.sock")  # the VM's socket dir
            yield Booted(run, ceph_cluster, before, qga, boot_s,
                         task_volumes(admin, ceph_cluster.pool))
    finally:
        # The run keeps its volumes: a module that failed (or was cut short by -k)
        # must not leave them in the session's pool.
        left = [n for n in task_volumes(admin, ceph_cluster.pool) if n not in before]
        if left:
            with contextlib.suppress(Exception):
                release(load_host_config(host), alloc_id=left[0].split("-", 1)[0], task="vm")
        shutil.rmtree(tmp, ignore_errors=True)


def _parent(admin: Any, pool: str, name: str) -> tuple[str, str, str]:
    _, rbd = bindings()
    with admin.open_ioctx(pool) as io, rbd.Image(io, name, read_only=True) as image:
        return tuple(image.parent_info())


def test_volumes_are_rbd_clones_sharing_one_base(booted: Booted, admin: Any) -> None:
    pool = booted.cluster.pool
    assert [n.split("-", 1)[1] for n in booted.volumes] == ["vm-0", "vm-1", "vm-2", "vm-3"]
    root, data, twin, _ = booted.volumes
    bases = [n for n in pool_state(admin, pool) if is_base(n) and n not in booted.before]
    assert len(bases) == 1, bases
    # Both chained disks are clones of the one base's protected snapshot, nothing copied.
    assert _parent(admin, pool, root) == _parent(admin, pool, twin) == (pool, bases[0], BASE_SNAP)
    _, rbd = bindings()
    with admin.open_ioctx(pool) as io:
        with rbd.Image(io, bases[0], snapshot=BASE_SNAP, read_only=True) as base:
            children = sorted(name for _, name in base.list_children())
            assert base.is_protected_snap(BASE_SNAP)
        with rbd.Image(io, data, read_only=True) as image:
            assert image.size() == 16 * MIB
        with rbd.Image(io, root, read_only=True) as image:
            assert image.size() == 128 * MIB
    assert children == [root, twin]


def test_guest_sees_the_rbd_disks(booted: Booted) -> None:
    code, out, err = agent_sh(booted.qga, "for d in /sys/block/vd*; do echo ${d##*/} "
                                          "$(cat $d/serial) $(cat $d/size); done")
    assert code == 0, err
    seen = {serial: int(sectors) * 512 for _, serial, sectors in
            (line.split() for line in out.splitlines() if line.strip())}
    assert seen["vmd-root"] == 128 * MIB and seen["vmd-data"] == 16 * MIB, seen
    assert "vmd-twin" in seen and seen["vmd-ro"] == 4 * MIB


def _device(booted: Booted, serial: str) -> str:
    find = (f"for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = {serial} ] && "
            "echo ${d##*/}; done; true")
    code, dev, err = agent_sh(booted.qga, find)
    assert code == 0 and dev.strip(), (serial, dev, err)
    return dev.strip()


def test_read_only_disk_refuses_the_guests_writes(booted: Booted) -> None:
    dev = _device(booted, "vmd-ro")
    # QEMU offers the device read-only (VIRTIO_BLK_F_RO), so the guest kernel refuses.
    code, out, err = agent_sh(booted.qga, f"cat /sys/block/{dev}/ro; "
                                          f"echo x > /dev/{dev} && sync && echo wrote")
    assert out.split() == ["1"] and "wrote" not in out, (code, out, err)


def test_the_key_is_in_no_argv_record_or_log(booted: Booted) -> None:
    key = booted.cluster.client_key
    argvs = []
    for p in psutil.process_iter(["cmdline"]):
        argvs.append(" ".join(p.info.get("cmdline") or ()))
    qemu = [a for a in argvs if "qemu-system" in a and str(booted.run.state) in a]
    assert qemu and "driver" in qemu[0] and "rbd" in qemu[0], qemu
    assert not [a for a in argvs if key in a]
    (record,) = booted.run.state.glob("run/*/vmdriver.json")
    assert booted.cluster.pool in record.read_text() and key not in record.read_text()
    key_files = []
    for path in booted.run.state.rglob("*"):
        if not path.is_file():
            continue
        text = path.read_bytes()
        if key.encode() in text:
            key_files.append(path)
    # Only QEMU's -object secret files hold it: one per RBD drive, 0600.
    assert key_files and all(p.suffix == ".key" for p in key_files), key_files
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in key_files)


def test_guest_writes_reach_the_data_volume(booted: Booted) -> None:
    dev = _device(booted, "vmd-data")
    # The pattern goes through the guest's page cache and virtio-blk to librbd; sync
    # makes the guest flush it, the stop below makes QEMU close the image.
    line = PATTERN.decode().splitlines()[0]
    script = (f"i=0; while [ $i -lt 64 ]; do echo {line}; i=$((i + 1)); done "
              f"> /dev/{dev} && sync && echo written")
    code, out, err = agent_sh(booted.qga, script)
    assert (code, out.strip()) == (0, "written"), err


@pytest.fixture(scope="module")
def stopped(booted: Booted, admin: Any) -> dict[str, Any]:
    """Stop the guest (the run keeps the volumes); read the data volume; destroy the task."""
    run = booted.run
    code = run.stop(timeout=180)
    pool, data = booted.cluster.pool, booted.volumes[1]
    kept = task_volumes(admin, pool)
    read = read_image(admin, pool, data, 0, len(PATTERN)) if data in kept else None
    ro = booted.volumes[3]
    ro_bytes = read_image(admin, pool, ro, 0, 4 * MIB) if ro in kept else None
    # What DestroyTask and the end of a run without --keep-volumes do.
    host = load_host_config(run.state.parent / "host.hcl")
    removed = release(host, alloc_id=data.split("-", 1)[0], task="vm")
    return {"code": code, "stderr": "".join(run.stderr), "kept": kept, "data": read,
            "ro": ro_bytes, "removed": sorted(removed)}


def test_data_written_by_the_guest_is_on_rbd_after_the_stop(
        booted: Booted, stopped: dict[str, Any]) -> None:
    assert stopped["code"] == 0, stopped["stderr"][-2000:]
    assert stopped["kept"] == booted.volumes
    assert stopped["data"] == PATTERN
    assert stopped["ro"] == bytes(4 * MIB)  # the read_only volume stayed as it was made
    assert booted.cluster.client_key not in stopped["stderr"]
    assert not list(booted.run.state.rglob("*.key"))  # the runtime dir went with the VM


def test_destroy_leaves_the_pool_as_it_was(booted: Booted, stopped: dict[str, Any],
                                           admin: Any) -> None:
    assert stopped["removed"] == booted.volumes
    assert pool_state(admin, booted.cluster.pool) == booted.before


# Section: failures, each a `vmdriver run` that must end with one clear line


def _failed_run(tmp: Path, host: Path, guest: Path, timeout: float) -> tuple[int, str, float]:
    job = job_file(tmp, DISKS.replace("GUEST", str(guest)))
    t0 = time.monotonic()
    out = subprocess.run((VMDRIVER, "run", str(job), "--host-config", str(host), "--state-dir",
                          str(tmp / "state"), "--quiet"), capture_output=True, text=True,
                         timeout=timeout, check=False, start_new_session=True)
    return out.returncode, out.stdout + out.stderr, time.monotonic() - t0


@pytest.fixture
def tmp(ceph_cluster: Cluster) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vrf-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_unreachable_monitors_fail_the_run_fast(ceph_cluster: Cluster, guest_dir: Path,
                                                tmp: Path, admin: Any) -> None:
    before = pool_state(admin, ceph_cluster.pool)
    mon = f"127.0.0.1:{free_port()}"
    host = host_file(tmp, ceph_cluster, hosts=mon, guest=guest_dir)
    code, out, took = _failed_run(tmp, host, guest_dir, timeout=120)
    assert code != 0 and took < 30, (code, took, out)
    assert "no Ceph monitor reachable" in out and mon in out, out
    assert "Traceback" not in out and ceph_cluster.client_key not in out
    assert pool_state(admin, ceph_cluster.pool) == before


def test_a_silent_monitor_fails_the_run_within_the_timeout(ceph_cluster: Cluster,
                                                          guest_dir: Path, tmp: Path) -> None:
    # Accepts TCP and never speaks Ceph: librados alone would wait 300 s.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        mon = f"127.0.0.1:{listener.getsockname()[1]}"
        host = host_file(tmp, ceph_cluster, hosts=mon, guest=guest_dir)
        code, out, took = _failed_run(tmp, host, guest_dir, timeout=120)
    assert code != 0 and took < 60, (code, took, out)
    assert f"monitors {mon} did not accept client.{ceph_cluster.client}" in out, out
    assert "Traceback" not in out


def test_wrong_key_fails_the_run_naming_the_user(ceph_cluster: Cluster, guest_dir: Path,
                                                 tmp: Path) -> None:
    wrong = gen_key()
    host = host_file(tmp, ceph_cluster, key=wrong, guest=guest_dir)
    code, out, took = _failed_run(tmp, host, guest_dir, timeout=120)
    assert code != 0 and took < 60, (code, took, out)
    assert f"client.{ceph_cluster.client}" in out, out
    assert wrong not in out and ceph_cluster.client_key not in out
    # One message (the CLI repeats it when its clean-up meets the same error). librados
    # (Ceph 16) also prints "handle_auth_bad_method" lines, whatever err_to_stderr says.
    ours = {line for line in out.splitlines() if line.startswith("vmdriver")}
    assert len(ours) == 1, out
    records = list((tmp / "state").glob("run/*/vmdriver.json"))
    assert all(wrong not in r.read_text() for r in records)


def test_a_full_pool_fails_the_run_and_leaves_no_volume_anywhere(
        ceph_cluster: Cluster, full_pool: RbdPool, guest_dir: Path, tmp: Path,
        admin: Any) -> None:
    # disk[0] is made in the healthy pool first; disk[1]'s pool is over its quota.
    before = {p: pool_state(admin, p) for p in (ceph_cluster.pool, FULL_POOL)}
    host = host_file(tmp, ceph_cluster, guest=guest_dir, full=full_pool)
    job = job_file(tmp, 'disk {\n size = "16MiB"\n primary = true\n}\n'
                        'disk {\n size = "4MiB"\n pool = "full"\n}')
    t0 = time.monotonic()
    out = subprocess.run((VMDRIVER, "run", str(job), "--host-config", str(host), "--state-dir",
                          str(tmp / "state"), "--quiet"), capture_output=True, text=True,
                         timeout=120, check=False, start_new_session=True)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and time.monotonic() - t0 < 60, text
    assert "disk[1]" in text and "the Ceph pool is full" in text, text
    assert "Traceback" not in text and full_pool.config.authentication.secret.get_secret_value() \
        not in text
    assert {p: pool_state(admin, p) for p in (ceph_cluster.pool, FULL_POOL)} == before
