"""Chained disks on Ceph RBD against local ones: creation time and guest boot time.

One run on the throwaway single-node cluster (tests/ceph/cluster.py), which this
starts and tears down unless ``cluster_dir`` names one that ``cluster.py up`` made:

* ``rbd_chained_first_s``: first chained RBD disk of the test guest's disk.raw (hash
  the image, import it into a base, snapshot, protect, clone);
* ``rbd_chained_s``: the next chained RBD disk of the same image (base exists: one clone);
* ``dir_chained_s``: the same through a directory pool (base exists: a qcow2 overlay);
* ``qemu_img_overlay_s``: a bare ``qemu-img create -f qcow2 -b disk.raw -F raw``;
* ``boot_rbd_s`` / ``boot_local_s``: QEMU start to the guest's readiness line (TCG,
  virtio-blk, SeaBIOS from the disk) from the chained RBD disk vs a local qcow2 overlay;
* ``run_rbd_s`` / ``run_local_s``: the same through vmdriver: `vmdriver run` of a virt
  job whose chained primary is in the ceph pool vs in a directory pool (bases exist),
  from the command's start to the guest's readiness line (volume, seed, QEMU, boot).

Run: ``.venv/bin/python -m bench.rbd [--no-boot] [--cluster DIR]``; ``python -m bench
--only rbd`` runs it in the suite (creation only with ``--smoke``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.ceph import cluster as ceph
from vmdriver.storage.base import Pool, SourceImage
from vmdriver.storage.config import CephPoolConfig
from vmdriver.storage.directory import DirectoryPool
from vmdriver.storage.disks import DiskRequest, DiskSource
from vmdriver.storage.rbd import RbdPool

if TYPE_CHECKING:
    from bench.cases import Env

REPO = Path(__file__).resolve().parent.parent
READY = "VMDRIVER-GUEST-READY"
DISK = DiskRequest(size=1 << 30, chained=True, source=DiskSource(image="disk.raw"))


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _chain(pool: Pool, image: SourceImage, alloc: str) -> Callable[[], object]:
    req = pool.volume_request(DISK, alloc_id=alloc, task="bench", index=0, image=image)
    return lambda: pool.create_volume(req)


def _boot(argv: list[str], console: Path, timeout: float = 240) -> float:
    """Seconds from QEMU's start to the readiness line; QEMU is stopped after."""
    start = time.perf_counter()
    proc = subprocess.Popen([*argv, "-serial", f"file:{console}"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < timeout and proc.poll() is None:
            if console.exists() and READY in console.read_text(errors="replace"):
                return time.perf_counter() - start
            time.sleep(0.1)
        raise RuntimeError(f"guest not ready (QEMU exit {proc.poll()})")
    finally:
        proc.terminate()  # SIGTERM: QEMU closes its RBD images cleanly
        proc.wait(timeout=30)


def _boot_argv(blockdev: dict[str, Any], extra: list[str]) -> list[str]:
    return ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "256", "-nodefaults",
            "-display", "none", "-nic", "none", *extra,
            "-blockdev", json.dumps({"driver": "raw", "node-name": "boot", "file": blockdev}),
            "-device", "virtio-blk-pci,drive=boot,bootindex=1"]


def measure(cl: ceph.Cluster, work: Path, *, boot: bool = True) -> dict[str, float]:
    """Every number of this module, measured once on cluster ``cl``."""
    guest = (REPO / "guest" / "out").resolve()
    cfg = CephPoolConfig(name="remote", pool=cl.pool, hosts=(cl.mon_host,),
                         authentication={"username": cl.client, "secret": cl.client_key})
    out: dict[str, float] = {}
    a1, a2 = secrets.token_hex(4), secrets.token_hex(4)
    with RbdPool(cfg) as rbd_pool, DirectoryPool("local", work / "pool") as dir_pool, \
            SourceImage.open(guest / "disk.raw", fmt="raw", where="bench") as image:
        assert isinstance(rbd_pool, RbdPool)
        rbd_pool.has_volume("x")  # connect outside the clock
        try:
            out["rbd_chained_first_s"] = _timed(_chain(rbd_pool, image, a1))
            out["rbd_chained_s"] = _timed(_chain(rbd_pool, image, a2))
            _chain(dir_pool, image, a1)()  # makes the directory pool's base
            out["dir_chained_s"] = _timed(_chain(dir_pool, image, a2))
            overlay = work / "overlay.qcow2"
            out["qemu_img_overlay_s"] = _timed(lambda: subprocess.run(
                ("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                 str(guest / "disk.raw"), str(overlay)), check=True))
            if boot:
                key = rbd_pool.write_secret_file(work / "key")
                vol = rbd_pool.task_volumes(a2, "bench")[0]
                out["boot_rbd_s"] = _boot(_boot_argv(
                    {**vol.protocol, "key-secret": "k"},
                    ["-object", f"secret,id=k,file={key},format=base64"]), work / "rbd.log")
                out["boot_local_s"] = _boot(_boot_argv(
                    {"driver": "qcow2", "file": {"driver": "file", "filename": str(overlay)}},
                    []), work / "local.log")
                host = _host_file(work, cfg, (work / "pool").resolve(), guest)
                for arm in ("rbd", "local"):
                    out[f"run_{arm}_s"] = _vmdriver_run(work / arm, host, guest, arm)
        finally:
            for alloc in (a1, a2):
                rbd_pool.remove_task_volumes(alloc, "bench")
    out["chained_ratio_rbd_vs_dir"] = out["rbd_chained_s"] / out["dir_chained_s"]
    out["chained_ratio_rbd_vs_qemu_img"] = out["rbd_chained_s"] / out["qemu_img_overlay_s"]
    if boot:
        out["boot_ratio_rbd_vs_local"] = out["boot_rbd_s"] / out["boot_local_s"]
        out["run_ratio_rbd_vs_local"] = out["run_rbd_s"] / out["run_local_s"]
    return out


def _host_file(work: Path, cfg: CephPoolConfig, dir_root: Path, guest: Path) -> Path:
    """Both pools: the ceph one (``rbd``) and the directory pool whose base exists (``local``)."""
    auth = cfg.authentication
    path = work / "host.hcl"
    path.write_text(f"""
image_paths = ["{guest}"]
virt_accelerator = "tcg"
jail = "off"  # the same for both arms: storage is what differs
storage_pools {{
  default = "local"
  directory "local" {{ path = "{dir_root}" }}
  ceph "rbd" {{
    pool = "{cfg.pool}"
    hosts = [{", ".join(f'"{h}"' for h in cfg.hosts)}]
    authentication {{
      username = "{auth.username}"
      secret = "{auth.secret.get_secret_value()}"
    }}
  }}
}}
""")
    path.chmod(0o600)
    return path


def _vmdriver_run(work: Path, host: Path, guest: Path, pool: str, timeout: float = 300) -> float:
    """Seconds from `vmdriver run` to the ready line, a chained primary in ``pool``; then stop."""
    work.mkdir()
    job = work / "job.hcl"
    job.write_text(f"""
job "bench-rbd" {{
  group "g" {{
    task "vm" {{
      driver = "virt"
      config {{
        disk {{
          chained = true
          pool    = "{pool}"
          size    = "1GiB"
          source {{ image = "{guest / 'disk.raw'}" }}
        }}
      }}
      resources {{ memory = 256 }}
      kill_timeout = "20s"
    }}
  }}
}}
""")
    vmdriver = str(Path(sys.executable).with_name("vmdriver"))
    state = ("--state-dir", str(work / "state"))
    start = time.perf_counter()
    proc = subprocess.Popen((vmdriver, "run", str(job), "--host-config", str(host), *state,
                             "--ready", READY, "--quiet"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "' ready" in line:
                return time.perf_counter() - start
            seen.append(line.strip())
            if time.perf_counter() - start > timeout:
                break
        raise RuntimeError(f"vmdriver run: guest not ready (exit {proc.poll()}): "
                           f"{' | '.join(seen[-3:])}")
    finally:
        subprocess.run((vmdriver, "stop", "--all", *state), capture_output=True, timeout=120,
                       check=False)
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(cluster_dir: Path | None = None, *, boot: bool = True) -> dict[str, float]:
    """Measure on the cluster in ``cluster_dir``, or on a new one started (and ended) here."""
    with tempfile.TemporaryDirectory(prefix="vmd-bench-rbd-", dir="/tmp") as tmp:
        work = Path(tmp)
        if cluster_dir is not None:
            return measure(ceph.load(cluster_dir), work, boot=boot)
        cl = ceph.up(work / "ceph", tied=True)
        try:
            return measure(cl, work, boot=boot)
        finally:
            ceph.down(cl.dir)


#: Suite rows (``python -m bench``): metric, key of :func:`measure`, arm, unit.
ROWS = (
    ("chained disk, base exists", "rbd_chained_s", "ceph rbd", "ms"),
    ("chained disk, base exists", "dir_chained_s", "directory pool", "ms"),
    ("chained disk, base exists", "qemu_img_overlay_s", "qemu-img create", "ms"),
    ("first chained disk of an image (base made)", "rbd_chained_first_s", "ceph rbd", "ms"),
    ("QEMU start → guest ready line", "boot_rbd_s", "ceph rbd", "s"),
    ("QEMU start → guest ready line", "boot_local_s", "local qcow2 overlay", "s"),
    ("vmdriver run → guest ready line", "run_rbd_s", "ceph rbd", "s"),
    ("vmdriver run → guest ready line", "run_local_s", "directory pool", "s"),
)


async def bench_rbd(env: Env) -> None:
    """rbd: chained disk creation and boot, Ceph RBD vs local, on a throwaway cluster."""
    from bench.cases import SMOKE, progress

    boot = env.sizes != SMOKE  # smoke: creation only (no cluster boots in the smoke budget)
    progress(f"rbd: throwaway Ceph cluster, chained disks{', 4 boots' if boot else ''}")
    try:
        out = await asyncio.to_thread(run, boot=boot)
    except ceph.ClusterError as exc:
        env.results.skip("rbd", f"the test Ceph cluster did not start: {exc}")
        return
    for metric, key, arm, unit in ROWS:
        if key in out:
            env.results.add("rbd", metric, arm, out[key] * (1000 if unit == "ms" else 1), unit)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rbd", description=__doc__)
    p.add_argument("--no-boot", action="store_true", help="creation times only")
    p.add_argument("--cluster", type=Path, help="a cluster dir from tests/ceph/cluster.py up")
    args = p.parse_args(argv)
    for name, value in run(args.cluster, boot=not args.no_boot).items():
        unit = "" if "ratio" in name else " s"
        print(f"{name:32} {value:10.4f}{unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
