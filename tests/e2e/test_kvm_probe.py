"""The KVM probe against this machine's real KVM and a real kernel."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from vmdriver.host.kvm import PROBE_TIMEOUT_S, cached_probe, probe_kvm

pytestmark = pytest.mark.e2e
QEMU = Path(shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64")


def kernel_boots_under_kvm(kernel: Path, seconds: float) -> bool:
    """Independent check with a generous time limit: does the kernel reach its root mount?"""
    try:
        out = subprocess.run(
            (str(QEMU), "-machine", "pc,accel=kvm", "-cpu", "max", "-m", "128", "-nodefaults",
             "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", str(kernel),
             "-append", "console=ttyS0 panic=-1"),
            capture_output=True, timeout=seconds, check=False, stdin=subprocess.DEVNULL).stdout
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
    return b"Unable to mount root" in out or b"Kernel panic" in out


def test_probe_answers_in_time_and_agrees_with_a_long_boot(guest_dir: Path, tmp_path: Path) -> None:
    kernel = guest_dir / "vmlinuz"
    t0 = time.monotonic()
    verdict = probe_kvm(QEMU, kernel)
    assert time.monotonic() - t0 < PROBE_TIMEOUT_S + 1.0
    assert verdict.kernel == str(kernel) or not Path("/dev/kvm").exists()
    if Path("/dev/kvm").exists():
        assert verdict.usable == kernel_boots_under_kvm(kernel, 15), verdict
    else:
        assert not verdict.usable and "/dev/kvm" in verdict.reason
    # The verdict is cached: a second call is immediate and identical in outcome.
    cached_probe(QEMU, tmp_path)
    t1 = time.monotonic()
    again = cached_probe(QEMU, tmp_path)
    assert time.monotonic() - t1 < 0.5
    assert again.usable == verdict.usable


def test_probe_without_a_kernel_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vmdriver.host.kvm.candidate_kernels", list)
    verdict = probe_kvm(QEMU)
    assert not verdict.usable
    assert "no Linux kernel found" in verdict.reason or "/dev/kvm" in verdict.reason
