"""swtpm as the core runs it for a runner VM with ``useTpm`` (vmdriver.qemu.sidecars.swtpm,
started by vmdriver.runtime.helpers): first start manufactures the TPM with swtpm_setup, a
VM-Operator data dir's state is moved in instead, and swtpm ends with QEMU (--terminate),
even when QEMU is SIGKILLed. The guest seeing /dev/tpm0 is in test_run.py (a runner boot)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from vmdriver.qemu.devices import TPM_SOCKET
from vmdriver.qemu.sidecars import TPM2_STATE_FILE, swtpm
from vmdriver.runtime.helpers import Helper, start_helper, stop_helpers

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None or shutil.which("swtpm_setup") is None,
                                reason="swtpm/swtpm_setup not installed (Debian: swtpm swtpm-tools)")


def start(data: Path, run: Path) -> Helper:
    run.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"]}
    return asyncio.run(start_helper(swtpm("2.0", run, data), run, env))


def stop(helper: Helper) -> None:
    asyncio.run(stop_helpers([helper]))


MADE = "Starting vTPM manufacturing"


def test_first_start_manufactures_the_tpm_and_later_starts_keep_it(state_dir: Path) -> None:
    data, run = state_dir / "data", state_dir / "run"
    data.mkdir()
    assert swtpm("2.0", run, data).start_timeout_s > 30  # set-up time on the first start
    t0 = time.monotonic()
    helper = start(data, run)
    took = time.monotonic() - t0
    try:
        log = helper.log_path.read_text()
        assert "Successfully created EK certificate" in log and "swtpm_setup failed" not in log, log
        assert (run / TPM_SOCKET).exists()
    finally:
        stop(helper)
    state = data / "tpm" / TPM2_STATE_FILE
    assert state.exists()
    assert swtpm("2.0", run, data).start_timeout_s <= 10
    helper = start(data, run)
    try:
        assert helper.log_path.read_text().count(MADE) == 1  # the log is appended to: no second run
    finally:
        stop(helper)
    print(f"first start with swtpm_setup: {took:.1f} s")


def test_vm_operator_state_is_moved_in_not_remanufactured(state_dir: Path) -> None:
    first, moved, run = state_dir / "a", state_dir / "b", state_dir / "run"
    first.mkdir()
    stop(start(first, state_dir / "run-a"))
    moved.mkdir()
    # VM-Operator keeps the state file in the data dir itself.
    shutil.copyfile(first / "tpm" / TPM2_STATE_FILE, moved / TPM2_STATE_FILE)
    before = hashlib.sha256((moved / TPM2_STATE_FILE).read_bytes()).hexdigest()
    helper = start(moved, run)
    try:
        assert not (moved / TPM2_STATE_FILE).exists()
        assert MADE not in helper.log_path.read_text()
    finally:
        stop(helper)
    # swtpm rewrites the state as it runs; the TPM is the old one: nothing was manufactured.
    assert (moved / "tpm" / TPM2_STATE_FILE).exists() and before


def test_swtpm_ends_when_qemu_is_killed(state_dir: Path) -> None:
    data, run = state_dir / "data", state_dir / "run"
    data.mkdir()
    helper = start(data, run)
    sock = run / TPM_SOCKET
    qemu = subprocess.Popen(("qemu-system-x86_64", "-S", "-machine", "pc,accel=tcg", "-nodefaults",
                             "-display", "none", "-chardev", f"socket,id=chrtpm,path={sock}",
                             "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0"),
                            stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # QEMU connects to swtpm while it sets the machine up
        assert qemu.poll() is None, qemu.stderr.read().decode() if qemu.stderr else ""
        qemu.kill()
        qemu.wait()
        deadline = time.monotonic() + 5
        while helper.proc.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not helper.proc.alive(), "swtpm outlived a SIGKILLed QEMU"
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
        if qemu.stderr:
            qemu.stderr.close()
        stop(helper)
