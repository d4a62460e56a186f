"""One job cannot alter a shared image other jobs boot: QEMU holds it read-only, writes go to an overlay.

The job is run for real (`vmdriver run`); while its QEMU is up, every fd QEMU
holds on the shared image is checked in ``/proc/PID/fdinfo``: none may be
writable. The image's bytes and mtime are unchanged after the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.security.conftest import Canary, Cli, qemu_job, refused_cleanly
from vmdriver.jobfile.inputs import TaskInputs
from vmdriver.jobfile.qemu import OVERLAY, build_spec, parse_config
from vmdriver.spec import FileMedium

VMDRIVER = str(Path(sys.executable).with_name("vmdriver"))


def _medium(image: str, env: dict[str, str]) -> FileMedium:
    spec = build_spec(parse_config({"image_path": image}, "t"), TaskInputs(name="t", where="t",
                                                                          env=env))
    medium = spec.drives[0].medium
    assert isinstance(medium, FileMedium)
    return medium


ENV = {"NOMAD_TASK_DIR": "/s/allocs/1/t/local", "NOMAD_ALLOC_DIR": "/s/allocs/1/alloc"}


@pytest.mark.parametrize("image,shared", [
    ("/srv/images/base.qcow2", True), ("/srv/images/../images/b.img", True),
    ("/s/allocs/1/t-other/x.img", True), ("/s/allocs/1/t/local/x.img", False),
    ("/s/allocs/1/alloc/data/x.img", False), ("local/x.img", False),
])
def test_writable_drive_on_a_shared_image_is_an_overlay(image: str, shared: bool) -> None:
    medium = _medium(image, ENV)
    if shared:
        assert (medium.path, medium.overlay_on, medium.format) == (OVERLAY, image, "qcow2")
    else:
        assert (medium.path, medium.overlay_on) == (image, None)
    # Without the task's paths every absolute image counts as shared.
    assert _medium("/s/allocs/1/t/local/x.img", {}).overlay_on is not None
    # A CD-ROM is read-only anyway.
    assert _medium("/srv/images/x.iso", ENV).overlay_on is None


def _writable_fds(pid: int, path: Path) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != str(path):
                continue
            flags = next(int(line.split()[1], 8) for line in
                         Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
                         if line.startswith("flags:"))
        except (FileNotFoundError, ProcessLookupError):
            continue
        if flags & os.O_ACCMODE != os.O_RDONLY:
            out.append(fd)
    return out


def test_running_qemu_holds_the_shared_image_read_only(cli: Cli) -> None:
    images = cli.root / "images"
    images.mkdir()
    shared = images / "shared.img"
    shared.write_bytes(b"\xeb\xfe" + bytes(1 << 20))  # a boot sector that spins: QEMU stays up
    before = (shared.read_bytes(), shared.stat().st_mtime)
    job = cli.root / "job.hcl"
    job.write_text(qemu_job().replace("local/disk.img", str(shared)))
    host = cli.root / "host.hcl"
    host.write_text(f'state_dir = "{cli.root / "s"}"\nimage_paths = ["{images}"]\n')
    proc = subprocess.Popen((VMDRIVER, "run", str(job), "--host-config", str(host), "--quiet"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        pid = None
        deadline = time.monotonic() + 60
        while pid is None and time.monotonic() < deadline and proc.poll() is None:
            pids = cli.qemus()
            pid = pids[0] if pids else None
            time.sleep(0.2)
        assert pid is not None, "no QEMU started"
        time.sleep(2)  # the drives are open once QEMU runs the guest
        held = [fd for fd in os.listdir(f"/proc/{pid}/fd")
                if os.path.realpath(f"/proc/{pid}/fd/{fd}") == str(shared)]
        overlay = any(os.path.realpath(f"/proc/{pid}/fd/{fd}").endswith(OVERLAY)
                      for fd in os.listdir(f"/proc/{pid}/fd"))
        assert held, "QEMU does not hold the shared image at all"
        assert _writable_fds(pid, shared) == []
        assert overlay, "the guest's writes have no overlay to go to"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert (shared.read_bytes(), shared.stat().st_mtime) == before
    assert not any(psutil.pid_exists(p) for p in cli.qemus())


@pytest.mark.parametrize("command", ["argv", "run"])
@pytest.mark.parametrize("image", ["/etc/shadow", "/proc/self/root/etc/shadow", "{canary}"])
def test_overlay_base_outside_the_allowed_dirs_is_refused(command: str, image: str, cli: Cli,
                                                          canary: Canary) -> None:
    job = qemu_job().replace("local/disk.img", image.format(canary=canary.path))
    status, err = cli.run(job, command=command)
    refused_cleanly(status, err, "outside the allowed dirs", "leads into /proc")
    assert canary.untouched() and cli.qemus() == []
