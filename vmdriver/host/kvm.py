"""Does KVM *work* here? A probe that takes guest code as far as a Linux kernel goes.

Opening ``/dev/kvm`` and running a few real-mode instructions is not enough: on
some nested-virtualization hosts a Linux kernel prints its first setup line and
then hangs. So the probe boots a real kernel under KVM with no root file
system and ``panic=-1 -no-reboot``; KVM is usable only if the kernel's
root-mount failure or panic reaches the serial port within the time limit.
The verdict is cached per boot of the host, kernel and QEMU binary.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vmdriver.errors import last_line

#: Serial output that proves the kernel ran to the point of mounting root.
_SUCCESS_MARKERS = (b"VFS: Unable to mount root", b"Kernel panic", b"No working init found")
PROBE_TIMEOUT_S = 3.0
#: Where the test guest's build keeps its kernel (one candidate kernel to probe with).
GUEST_CACHE = Path(os.environ.get("VMDRIVER_GUEST_CACHE", "/var/cache/vmdriver/guest"))


@dataclass(frozen=True)
class KvmVerdict:
    """The outcome of the KVM probe."""

    usable: bool
    reason: str
    kernel: str = ""
    seconds: float = 0.0


def candidate_kernels() -> list[Path]:
    """Kernels to probe with, best first: an explicit one, the host's, the test guest's."""
    out: list[Path] = []
    if env := os.environ.get("VMDRIVER_PROBE_KERNEL"):
        out.append(Path(env))
    release = os.uname().release
    out.append(Path(f"/boot/vmlinuz-{release}"))
    out.extend(Path(p) for p in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True))
    out.extend(Path(p) for p in sorted(glob.glob(str(GUEST_CACHE / "*" / "vmlinuz"))))
    return [p for p in dict.fromkeys(out) if p.is_file()]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def probe_kvm(qemu: Path, kernel: Path | None = None, timeout: float = PROBE_TIMEOUT_S) -> KvmVerdict:
    """Boot ``kernel`` under KVM with ``qemu`` and report whether it got far enough."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return KvmVerdict(False, f"/dev/kvm cannot be opened: {exc.strerror}")
    os.close(fd)
    if kernel is None:
        kernels = candidate_kernels()
        if not kernels:
            return KvmVerdict(
                False,
                "no Linux kernel found to probe KVM with (looked in /boot and the test "
                "guest cache; set VMDRIVER_PROBE_KERNEL): KVM treated as unusable",
            )
        kernel = kernels[0]
    argv = (
        str(qemu), "-machine", "pc,accel=kvm", "-cpu", "max", "-m", "128", "-nodefaults",
        "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", str(kernel),
        "-append", "console=ttyS0 panic=-1 earlyprintk=serial",
    )
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    seen = b""
    try:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        while time.monotonic() - start < timeout:
            chunk = proc.stdout.read(65536)
            if chunk:
                seen += chunk
                if any(m in seen for m in _SUCCESS_MARKERS):
                    return KvmVerdict(True, "a Linux kernel booted under KVM", str(kernel),
                                      time.monotonic() - start)
            elif proc.poll() is not None and not chunk:
                break
            else:
                time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
    elapsed = time.monotonic() - start
    tail = last_line(seen.decode(errors="replace")) or "no output"
    return KvmVerdict(
        False,
        f"a Linux kernel did not get to mounting root under KVM within {timeout:.0f}s "
        f"(last serial line: {tail[:120]!r})",
        str(kernel),
        elapsed,
    )


def cached_probe(qemu: Path, cache_dir: Path, *, refresh: bool = False) -> KvmVerdict:
    """:func:`probe_kvm`, remembered per host boot, kernel and QEMU binary."""
    kernels = candidate_kernels()
    key = {
        "boot": _boot_id(),
        "qemu": str(qemu),
        "qemu_mtime": qemu.stat().st_mtime if qemu.exists() else 0,
        "kernel": str(kernels[0]) if kernels else "",
    }
    cache = cache_dir / "kvm-probe.json"
    if not refresh:
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            data = json.loads(cache.read_text())
            if data["key"] == key:
                return KvmVerdict(**data["verdict"])
    verdict = probe_kvm(qemu, kernels[0] if kernels else None)
    with contextlib.suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "verdict": asdict(verdict)}))
        tmp.replace(cache)
    return verdict
