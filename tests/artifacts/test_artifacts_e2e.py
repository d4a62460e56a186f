"""`vmdriver run` of a job whose image comes over HTTP, checksummed, boots the test guest."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.artifacts.artifact_server import ArtifactServer
from tests.conftest import READY
from tests.e2e.guest import stderr_until

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]
VMDRIVER = str(Path(sys.executable).with_name("vmdriver"))


def test_run_boots_an_image_fetched_over_http(server: ArtifactServer, guest_dir: Path,
                                              state_dir: Path, tmp_path: Path) -> None:
    # A qcow2 image: the task gets an overlay whose backing file is the cached copy,
    # which the launch policy admits as a backing file only (docs/artifacts.md).
    image = (guest_dir / "disk.qcow2").read_bytes()
    url = server.add("/images/disk.qcow2", image, drop_after=len(image) // 3)  # one resume
    digest = hashlib.sha256(image).hexdigest()
    job = tmp_path / "job.nomad.hcl"
    job.write_text(f"""
job "art" {{
  group "g" {{
    task "vm" {{
      driver = "qemu"
      config {{
        image_path        = "local/disk.qcow2"
        graceful_shutdown = true
      }}
      resources {{
        memory = 256
      }}
      artifact {{
        source = "{url}"
        options {{
          checksum = "sha256:{digest}"
        }}
      }}
    }}
  }}
}}
""")
    proc = subprocess.Popen(
        (VMDRIVER, "run", str(job), "--state-dir", str(state_dir), "--ready", READY, "--quiet"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    try:
        lines = stderr_until(proc, "task 'vm' ready")
        assert any("task 'vm' ready" in line for line in lines), "".join(lines)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    text = "".join(lines)
    # Plain progress lines (stderr is not a terminal), the resume, then the overlay.
    assert f"artifact {url}: download done {len(image) / 2**20:.1f} MiB" in text
    assert server.hits["/images/disk.qcow2"] == 2 and server.ranges
    assert "overlay on the cached copy" in text
    blob = state_dir / "cache" / "entries" / f"sha256-{digest}" / "blob"
    assert blob.read_bytes() == image  # the guest ran and wrote; the cache did not change
