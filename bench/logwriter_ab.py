"""What the per-VM log writer process costs a start and a burst: an A/B against bare QEMU.

    .venv/bin/python -m bench.logwriter_ab [ROUNDS] [VMS]

Three arms, interleaved round by round: vmdriver as it is (QEMU's stdout and
stderr through a log writer process of the VM's own), vmdriver with the writer
left out (``runtime.logs.rotatable`` answering no, so QEMU writes its log files
directly, as before the writer existed), and the bare harness. Both vmdriver
arms run ``jail = "off"``, so all three launch the same QEMU argv. A diagnosis,
not a case of the suite: it patches a runtime function in this process.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench.arms import Arm, BareArm, VmdriverArm
from vmdriver.runtime import logs

_REAL_ROTATABLE = logs.rotatable


def _no_writer(path: Path) -> bool:
    return False


async def run(rounds: int, n: int) -> dict[str, list[float]]:
    """ms per round: one VM's start (n == 1) or the wall time of ``n`` VMs at once."""
    root = Path(tempfile.mkdtemp(prefix="vb-lw-", dir="/tmp"))
    arms: dict[str, Arm] = {"vmdriver": VmdriverArm(root / "w", jail="off"),
                            "vmdriver, no log writer": VmdriverArm(root / "n", jail="off"),
                            "bare": BareArm(root / "b")}
    out: dict[str, list[float]] = {k: [] for k in arms}
    try:
        for i in range(rounds + 1):  # round 0 warms up
            for name, arm in arms.items():
                logs.rotatable = _no_writer if "no log writer" in name else _REAL_ROTATABLE
                try:
                    res = await arm.start(n, "tiny")
                finally:
                    await arm.kill()
                if "error" in res:
                    raise RuntimeError(f"{name}: {res['error']}")
                if i:
                    out[name].append((res["each"][0] if n == 1 else res["wall"]) * 1000)
    finally:
        logs.rotatable = _REAL_ROTATABLE
        shutil.rmtree(root, ignore_errors=True)
    return out


def main(argv: list[str]) -> int:
    """Print the medians and the ratios to bare."""
    logging.disable(logging.WARNING)  # jail = off warns once per VM
    rounds = int(argv[0]) if argv else 8
    n = int(argv[1]) if len(argv) > 1 else 1
    out = asyncio.run(run(rounds, n))
    floor = statistics.median(out["bare"])
    for name, values in out.items():
        med = statistics.median(values)
        print(f"{name:26} median {med:8.1f} ms  {med / floor:5.2f}x bare  "
              f"({', '.join(f'{v:.0f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
