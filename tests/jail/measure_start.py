"""Start-time cost of the jail: spawn -> QMP greeting, with and without it.

    .venv/bin/python -m tests.jail.measure_start [RUNS]

Runs ``qemu-system-x86_64 -S -machine none -display none`` (QMP on an inherited
socketpair) RUNS times each way, interleaved so host load hits both alike, and
prints the medians. "jailed" includes everything per launch: the uid lease,
prepare_dirs, wrap_argv and release; the read-only path list is computed once
per binary (cached) and so is left out.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.jail.conftest import IDLE, make_vm, spawn
from vmdriver.jail import dirs, ids
from vmdriver.jail.paths import qemu_ro_paths
from vmdriver.jail.plan import SETPRIV, JailSpec


def _once(state: Path, n: int, jail: bool) -> float:
    t0 = time.perf_counter()
    vm = make_vm(state, f"m{n}-{int(jail)}") if jail else None
    spec = vm.spec if vm else JailSpec(uid=None, gid=None)
    j = spawn(IDLE, spec, state, jail=jail)
    j.read_greeting()
    elapsed = time.perf_counter() - t0
    j.kill()
    if vm:
        dirs.release(vm.spec)
        ids.release(vm.lease)
    return elapsed


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    qemu_ro_paths(IDLE[0], (SETPRIV,))  # warm the per-binary cache, as a running supervisor has
    state = Path(tempfile.mkdtemp(prefix="vmdj-m-", dir="/tmp"))
    samples: dict[bool, list[float]] = {False: [], True: []}
    try:
        for n in range(runs + 1):
            for jail in (False, True):
                t = _once(state, n, jail)
                if n:  # the first round warms page caches
                    samples[jail].append(t)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    bare, jailed = (statistics.median(samples[k]) * 1000 for k in (False, True))
    print(f"load average: {os.getloadavg()[0]:.2f}, runs: {runs}")
    print(f"bare   median {bare:7.1f} ms  (min {min(samples[False]) * 1000:.1f})")
    print(f"jailed median {jailed:7.1f} ms  (min {min(samples[True]) * 1000:.1f})")
    print(f"jail cost      {jailed - bare:7.1f} ms  ({jailed / bare:.2f}x)")


if __name__ == "__main__":
    main()
