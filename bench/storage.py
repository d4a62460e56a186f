"""Storage pool benchmarks: chained disk creation and full clones, as medians and ratios.

* :func:`chained_create`: a chained disk (qcow2 overlay on the shared base) from a
  1 GiB and a 10 GiB image (sparse raw, data spread through it like a cloud image),
  once the base exists; target ≤ 50 ms, flat in the image's size. The first
  creation (hash + base copy) is reported apart.
* :func:`full_clone`: ``source.volume`` clone of a dense volume against
  ``cp --reflink=auto`` of the same file, interleaved; target ≥ 0.8x cp's speed.

Both run in a temp dir (``workdir``: default /tmp; pass a reflink filesystem to
measure that case) and need nothing but qemu-img. Run standalone:

    .venv/bin/python -m bench.storage [--rounds N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from vmdriver.storage import SourceImage
from vmdriver.storage.directory import DirectoryPool
from vmdriver.storage.disks import parse_disk

GIB = 1 << 30
MIB = 1 << 20


def _sparse_image(path: Path, size: int, data: int) -> None:
    """A raw image of ``size`` with ``data`` bytes of random data spread through it."""
    chunk = os.urandom(MIB)
    with path.open("wb") as f:
        f.truncate(size)
        step = size // (data // MIB)
        for off in range(0, size, step):
            f.seek(off)
            f.write(chunk)


def _ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def chained_create(rounds: int = 15, workdir: Path | None = None,
                   data: int = 256 * MIB) -> dict[str, Any]:
    """Median ms to create a chained disk on a 1 GiB and a 10 GiB image, and their ratio."""
    root = Path(tempfile.mkdtemp(prefix="vmd-bench-st-", dir=workdir or "/tmp"))
    out: dict[str, Any] = {}
    try:
        pool = DirectoryPool("bench", root / "pool")
        disk = parse_disk({"size": "20GiB", "chained": True, "source": {"image": "x"}}, "disk[0]")
        samples: dict[str, list[float]] = {}
        for label, size in (("1GiB", GIB), ("10GiB", 10 * GIB)):
            img = root / f"{label}.raw"
            _sparse_image(img, size, data)
            with SourceImage.open(img, where="bench") as src:
                t = time.perf_counter()
                pool.create_volume(pool.volume_request(disk, alloc_id=f"first{label:>03}",
                                                       task="t", index=0, image=src))
                out[f"first_ms_{label}"] = round((time.perf_counter() - t) * 1000, 1)
            samples[label] = []
        # Interleaved, each round opening the image as a task start would.
        for i in range(rounds):
            for label, times in samples.items():
                t = time.perf_counter()
                with SourceImage.open(root / f"{label}.raw", where="bench") as src:
                    pool.create_volume(pool.volume_request(
                        disk, alloc_id=f"r{i:07d}", task=label, index=0, image=src))
                times.append(time.perf_counter() - t)
        pool.close()
        out.update({f"median_ms_{k}": _ms(v) for k, v in samples.items()})
        out["ratio_10GiB_vs_1GiB"] = round(statistics.median(samples["10GiB"])
                                           / statistics.median(samples["1GiB"]), 3)
        out["target"] = "median_ms_10GiB <= 50, ratio ~1 (flat in size)"
        out["samples_ms"] = {k: [t * 1000 for t in v] for k, v in samples.items()}
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def full_clone(rounds: int = 7, size: int = 512 * MIB,
               workdir: Path | None = None) -> dict[str, Any]:
    """Median seconds of a pool clone and of ``cp --reflink=auto``; speed ratio (ours/cp)."""
    root = Path(tempfile.mkdtemp(prefix="vmd-bench-st-", dir=workdir or "/tmp"))
    try:
        pool = DirectoryPool("bench", root / "pool")
        src = pool.root / "golden.qcow2"
        raw = root / "golden.raw"
        with raw.open("wb") as f:
            for _ in range(size // MIB):
                f.write(os.urandom(MIB))
        subprocess.run(("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(src)),
                       check=True)
        raw.unlink()
        disk = parse_disk({"source": {"volume": src.name}}, "disk[0]")
        ours: list[float] = []
        cp: list[float] = []
        for i in range(rounds + 1):  # round 0 warms the page cache for both
            req = pool.volume_request(disk, alloc_id=f"c{i:07d}", task="t", index=0)
            t = time.perf_counter()
            pool.create_volume(req)
            d_ours = time.perf_counter() - t
            dest = root / f"cp-{i}.qcow2"
            t = time.perf_counter()
            subprocess.run(("cp", "--reflink=auto", "--", str(src), str(dest)), check=True)
            d_cp = time.perf_counter() - t
            pool.remove_task_volumes(f"c{i:07d}", "t")
            dest.unlink()
            if i:
                ours.append(d_ours)
                cp.append(d_cp)
        pool.close()
        return {"size_MiB": size // MIB, "median_ms_pool_clone": _ms(ours),
                "median_ms_cp_reflink_auto": _ms(cp),
                "speed_ratio_vs_cp": round(statistics.median(cp) / statistics.median(ours), 3),
                "target": "speed_ratio_vs_cp >= 0.8",
                "samples_ms": {"pool_clone": [t * 1000 for t in ours], "cp": [t * 1000 for t in cp]}}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    """Run both and print JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    print(json.dumps({"chained_create": chained_create(args.rounds, args.workdir),
                      "full_clone": full_clone(max(3, args.rounds // 2),
                                               workdir=args.workdir)}, indent=2))


if __name__ == "__main__":
    main()
