"""Chained disks on Ceph RBD against local ones: creation time and guest boot time.

One run on the throwaway single-node cluster (tests/ceph/cluster.py), which this
starts and tears down unless ``cluster_dir`` names one that ``cluster.py up`` made:

* ``rbd_chained_first_s``: first chained RBD disk of the test guest's disk.raw (hash
  the image, import it into a base, snapshot, protect, clone);
* ``rbd_chained_s``: the next chained RBD disk of the same image (base exists: one clone);
* ``dir_chained_s``: the same through a directory pool (base exists: a qcow2 overlay);
* ``qemu_img_overlay_s``: a bare ``qemu-img create -f qcow2 -b disk.raw -F raw``;
* ``boot_rbd_s`` / ``boot_local_s``: QEMU start to the guest's readiness line (TCG,
  virtio-blk, SeaBIOS from the disk) from the chained RBD disk vs a local qcow2 overlay.

Run: ``.venv/bin/python -m bench.rbd [--no-boot] [--cluster DIR]``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.ceph import cluster as ceph
from vmdriver.storage.base import Pool, SourceImage
from vmdriver.storage.config import CephPoolConfig
from vmdriver.storage.directory import DirectoryPool
from vmdriver.storage.disks import DiskRequest, DiskSource
from vmdriver.storage.rbd import RbdPool

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
        finally:
            for alloc in (a1, a2):
                rbd_pool.remove_task_volumes(alloc, "bench")
    out["chained_ratio_rbd_vs_dir"] = out["rbd_chained_s"] / out["dir_chained_s"]
    out["chained_ratio_rbd_vs_qemu_img"] = out["rbd_chained_s"] / out["qemu_img_overlay_s"]
    if boot:
        out["boot_ratio_rbd_vs_local"] = out["boot_rbd_s"] / out["boot_local_s"]
    return out


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
