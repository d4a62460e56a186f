"""The snapshot commands as a user runs them: `vmdriver run` a template, `vmdriver snapshot`,
a job of clones with `snapshot = "NAME"`, `ls`, `rm`, and a refused clone job."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.e2e.guest import free_port, overlay, stderr_until
from tests.e2e.test_cli import VMDRIVER, host_file, job_file, start_run, vmdriver, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]


def _clone_job(tmp: Path, image: str, count: int, memory: int = 256) -> Path:
    path = tmp / f"clones-{count}-{memory}.nomad.hcl"
    path.write_text(f"""
job "clones" {{
  group "g" {{
    count = {count}
    network {{
      port "http" {{
        to = 8080
      }}
    }}
    task "vm" {{
      driver = "qemu"
      config {{
        image_path        = "{image}"
        graceful_shutdown = true
        vmgenid           = true
        snapshot          = "tmpl"
        ports             = ["http"]
      }}
      resources {{
        memory = {memory}
      }}
      kill_timeout = "30s"
    }}
  }}
}}
""")
    return path


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    return err


def test_snapshot_commands_and_clone_job(tmp_path: Path, state_dir: Path, guest_dir: Path) -> None:
    image = overlay(guest_dir, tmp_path / "images" / "disk.qcow2")
    host = host_file(tmp_path, image.parent)
    state = ("--state-dir", str(state_dir))
    template = start_run(job_file(tmp_path, str(image), free_port(), "vmgenid = true"), host,
                         state_dir)
    clones: subprocess.Popen[str] | None = None
    try:
        wait_ready(template)
        made = vmdriver("snapshot", "vm", "tmpl", *state)
        assert made.returncode == 0, made.stderr
        assert re.search(r"snapshot tmpl: 256 MiB guest RAM, state [\d.]+ MiB saved", made.stdout)
        clones = subprocess.Popen(
            (VMDRIVER, "run", str(_clone_job(tmp_path, str(image), 2)), "--host-config",
             str(host), *state, "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        lines = stderr_until(clones, "running", 120) + stderr_until(clones, "running", 120)
        ports = [int(p) for line in lines for p in re.findall(r"http host:(\d+)", line)]
        assert len(ports) == 2, lines
        for port in ports:  # already booted: serving at once, no readiness wait
            assert "vmdriver-test-guest" in httpx.get(f"http://127.0.0.1:{port}/", timeout=20).text
        listing = json.loads(vmdriver("snapshot", "ls", "--json", *state).stdout)
        assert [(r["name"], r["in_use"], r["complete"]) for r in listing] == [("tmpl", True, True)]
        busy = vmdriver("snapshot", "rm", "tmpl", *state)
        assert busy.returncode == 2 and "in use" in busy.stderr
        # Other hardware than the snapshot's: one line, exit 2, nothing started.
        bigger = vmdriver("run", str(_clone_job(tmp_path, str(image), 1, memory=512)),
                          "--host-config", str(host), *state)
        assert bigger.returncode == 2 and "Traceback" not in bigger.stderr
        assert "other hardware" in bigger.stderr and "memory_mib" in bigger.stderr
        assert "running" in vmdriver("ps", *state).stdout
    finally:
        if clones is not None:
            _stop(clones)
        _stop(template)
    assert vmdriver("snapshot", "rm", "tmpl", *state).returncode == 0
    assert vmdriver("snapshot", "ls", *state).stdout == ""
