"""An allowed job under a strict operator policy boots the test guest and stops cleanly.

One boot: `vmdriver run` as a user runs it, with every allowlist set, the image
behind an ``image_paths`` entry and a backing file in another one, extra args
that pass the allowlist and reach only a safe device.
"""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import qemu_processes
from tests.e2e.guest import READY, overlay, stderr_until

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]
VMDRIVER = str(Path(sys.executable).with_name("vmdriver"))


def test_allowed_job_runs_under_strict_policy(tmp_path: Path, state_dir: Path,
                                              guest_dir: Path) -> None:
    image = overlay(guest_dir, tmp_path / "images" / "disk.qcow2")
    host = tmp_path / "host.hcl"
    host.write_text(f'''
plugin "qemu" {{
  config {{
    image_paths         = ["{image.parent}", "{guest_dir}"]
    args_allowlist      = ["-object", "--device", "smp"]
    emulators_allowlist = ["qemu-system-x86_64"]
    state_dir           = "{state_dir}"
  }}
}}
''')
    job = tmp_path / "job.hcl"
    job.write_text(f'''
job "strict" {{
  group "g" {{
    task "vm" {{
      driver = "qemu"
      config {{
        image_path        = "{image}"
        graceful_shutdown = true
        args = ["-object", "rng-random,id=rng0,filename=/dev/urandom",
                "-device", "virtio-rng-pci,rng=rng0", "-smp", "1"]
      }}
      resources {{
        memory = 256
      }}
      kill_timeout = "30s"
    }}
  }}
}}
''')
    proc = subprocess.Popen((VMDRIVER, "run", str(job), "--host-config", str(host), "--quiet",
                             "--ready", READY), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = stderr_until(proc, "ready", timeout=120)
        assert any("ready" in line for line in lines), "".join(lines)
        (pid,) = qemu_processes(str(state_dir))
        qemu = psutil.Process(pid)
        cmdline = qemu.cmdline()
        # The image reached QEMU as the open file policy checked, not as a path.
        assert any('"filename":"/dev/fdset/1"' in a for a in cmdline), cmdline
        assert not any(str(image) in a for a in cmdline)
        assert str(image) in {f.path for f in qemu.open_files()}
        assert "-sandbox" in cmdline and "-no-user-config" in cmdline
        # The control socket is in the VM's runtime dir, private, never in the task dir.
        (sock,) = state_dir.glob("run/*/vm/qmp.sock")
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        # Private: nobody else may enter (the jail's ACL lets only the VM's uid pass
        # the runtime dir, which shows as the group bits' mask).
        for d in (sock.parent, sock.parent.parent):
            assert stat.S_IMODE(d.stat().st_mode) & 0o007 == 0, oct(d.stat().st_mode)
        assert not list(state_dir.glob("allocs/**/*.sock"))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "stopped" in err
