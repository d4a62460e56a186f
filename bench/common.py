"""What every benchmark shares: the VM specs, PSS, summaries and host facts."""

from __future__ import annotations

import os
import platform
import re
import shutil
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmdriver.jobfile import qemu
from vmdriver.jobfile.inputs import TaskInputs
from vmdriver.runtime.cgroup import detect_mode
from vmdriver.spec import Accelerator, Resources, VMSpec

REPO = Path(__file__).resolve().parent.parent
GUEST = REPO / "guest" / "out"
READY = "VMDRIVER-GUEST-READY"
#: Guest RAM of the no-disk VMs of start/burst/scale/stop.
TINY_MIB = 32
#: Guest RAM of the boot VMs (the test guest's kernel and initrd need room).
BOOT_MIB = 256


def tiny_spec(name: str) -> VMSpec:
    """A VM with no disk and no default devices: SeaBIOS finds nothing and idles."""
    return VMSpec(name=name, accelerator=Accelerator.TCG, resources=Resources(memory_mib=TINY_MIB),
                  args=("-nodefaults",))


def boot_spec(name: str, image: Path) -> VMSpec:
    """The test guest under TCG, stopped with the ACPI button (Nomad's graceful_shutdown).

    Built by the qemu dialect from the same config as the `vmdriver run` arm's job
    (bench.client.JOB_HCL), so every arm boots the same guest view (IDE disk plus
    the empty CD-ROM Nomad's ``-drive if=ide`` leaves).
    """
    cfg = qemu.parse_config({"image_path": str(image), "accelerator": "tcg",
                             "graceful_shutdown": True}, name)
    return qemu.build_spec(cfg, TaskInputs(name=name, where=name, memory_mb=BOOT_MIB,
                                           kill_timeout_s=30.0))


def make_overlay(dest: Path) -> Path:
    """A throwaway qcow2 overlay on the test guest's disk, so no run writes to the image."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    base = (GUEST / "disk.qcow2").resolve()
    subprocess.run(("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                    str(dest)), check=True)
    return dest


def pss_kib(pid: int | str = "self") -> int:
    """Proportional set size of a process in KiB (``/proc/PID/smaps_rollup``)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs``."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return float("nan")
    return float(statistics.linear_regression(xs, ys).slope)


@dataclass
class Series:
    """Samples of one metric for one arm."""

    values: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        """One more sample."""
        self.values.append(v)

    @property
    def median(self) -> float:
        """Median, NaN if empty."""
        return statistics.median(self.values) if self.values else float("nan")


def guest_ready() -> str | None:
    """Why the boot benchmarks cannot run, or ``None`` if the test guest is built."""
    if not (GUEST / "manifest.json").exists() or not (GUEST / "disk.qcow2").exists():
        return "test guest not built (run bash guest/build.sh)"
    return None


def _first_line(cmd: tuple[str, ...]) -> str:
    if shutil.which(cmd[0]) is None:
        return "not installed"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "unknown"


def host_facts() -> dict[str, Any]:
    """Facts that make a result readable: CPU, kernel, QEMU, accelerator, cgroups."""
    cpu = "unknown"
    flags = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    cgroup = str(detect_mode())
    qemu = _first_line(("qemu-system-x86_64", "--version"))
    m = re.search(r"version ([\w.+~-]+)", qemu)
    commit = subprocess.run(("git", "-C", str(REPO), "rev-parse", "--short", "HEAD"),
                            capture_output=True, text=True, check=False).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": m.group(1) if m else qemu,
        "accelerator": "tcg (KVM guests hang on this host; every arm runs the same accelerator)",
        "kvm_device": Path("/dev/kvm").exists(),
        "nested_virt_flags": "vmx/svm" if re.search(r"\b(vmx|svm)\b", flags) else "none (nested)",
        "cgroup": cgroup,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "libvirt": _first_line(("libvirtd", "--version")),
        "vmdriver_commit": commit or "unknown",
    }
