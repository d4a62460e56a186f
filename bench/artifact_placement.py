"""How should a task get its own writable copy of a cached image?

Measures, for a small real image (the test guest's disk, ~12-15 MB) and a
generated 1 GiB image (sparse, 256 MiB of data in it, like a cloud image), the
wall time (including fsync of the result) and the disk blocks used by:

* ``copyfile``  - shutil.copyfile (sendfile: holes become real zeros)
* ``cp-sparse`` - cp --reflink=auto --sparse=always (keeps holes, reflinks on btrfs/xfs)
* ``overlay``   - qemu-img create -f qcow2 -F <fmt> -b <cached file>

Run: .venv/bin/python bench/artifact_placement.py [WORKDIR]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def used(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def make_big_raw(path: Path, size: int = 1 << 30, data: int = 256 << 20) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        chunk = os.urandom(1 << 20)
        step = size // (data >> 20)
        for off in range(0, size, step):
            f.seek(off)
            f.write(chunk)


def place(kind: str, src: Path, fmt: str, dst: Path) -> None:
    if kind == "copyfile":
        shutil.copyfile(src, dst)
    elif kind == "cp-sparse":
        subprocess.run(("cp", "--reflink=auto", "--sparse=always", str(src), str(dst)), check=True)
    else:
        subprocess.run(("qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(src),
                        str(dst)), check=True)


def measure(label: str, src: Path, fmt: str, out: Path) -> None:
    print(f"{label}: {src.stat().st_size / 2**20:.0f} MiB apparent, "
          f"{used(src) / 2**20:.1f} MiB on disk ({fmt})")
    for kind in ("copyfile", "cp-sparse", "overlay"):
        times = []
        for i in range(3):
            dst = out / f"{kind}-{i}"
            subprocess.run(("sync",), check=True)
            t0 = time.perf_counter()
            place(kind, src, fmt, dst)
            fd = os.open(dst, os.O_RDONLY)
            os.fsync(fd)  # count writeback: a copy's cost is mostly its writes
            os.close(fd)
            times.append(time.perf_counter() - t0)
            size = used(dst)
            dst.unlink()
        print(f"  {kind:<10} {min(times) * 1000:8.1f} ms (best of 3)  {size / 2**20:8.1f} MiB used")


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="vmd-bench-"))
    try:
        guest = REPO / "guest" / "out"
        for name, fmt in (("disk.qcow2", "qcow2"), ("disk.raw", "raw")):
            if (guest / name).exists():
                measure(f"guest {name}", guest / name, fmt, work)
        big = work / "big.raw"
        make_big_raw(big)
        measure("generated big.raw", big, "raw", work)
        bigq = work / "big.qcow2"
        subprocess.run(("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(big), str(bigq)),
                       check=True)
        measure("generated big.qcow2", bigq, "qcow2", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
