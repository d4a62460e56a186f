"""`vmdriver run`, `stop`, `ps` and `argv` as a user runs them: real processes, real guest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import qemu_processes
from tests.e2e.cgroups import memory_limit
from tests.e2e.guest import READY, free_port, overlay, stderr_until
from vmdriver.runtime import cgroup
from vmdriver.runtime.record import records_under

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]
VMDRIVER = str(Path(sys.executable).with_name("vmdriver"))


def job_file(tmp: Path, image: str, port: int, extra_config: str = "") -> Path:
    path = tmp / "job.nomad.hcl"
    path.write_text(f"""
job "cli" {{
  group "g" {{
    network {{
      port "http" {{
        static = {port}
      }}
    }}
    task "vm" {{
      driver = "qemu"
      config {{
        image_path        = "{image}"
        graceful_shutdown = true
        port_map {{
          http = 8080
        }}
        {extra_config}
      }}
      resources {{
        memory = 256
      }}
      kill_timeout = "30s"
    }}
  }}
}}
""")
    return path


def host_file(tmp: Path, image_dir: Path) -> Path:
    # The overlay's backing file is the shared test guest: the operator allows both.
    path = tmp / "host.hcl"
    guest = (image_dir / "disk.qcow2").resolve()
    backing = Path(__import__("json").loads(subprocess.run(
        ("qemu-img", "info", "--output=json", str(guest)), capture_output=True, text=True,
        check=True).stdout)["backing-filename"]).resolve().parent
    path.write_text(f'image_paths = ["{image_dir}", "{backing}"]\n')
    return path


def vmdriver(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run((VMDRIVER, *args), capture_output=True, text=True, timeout=120,
                          check=False, env=env)


def start_run(job: Path, host: Path, state: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        (VMDRIVER, "run", str(job), "--host-config", str(host), "--state-dir", str(state),
         "--ready", READY),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen[str], timeout: float = 120) -> list[str]:
    """stderr lines of `vmdriver run` up to its readiness announcement."""
    lines = stderr_until(proc, "ready", timeout)
    if not any("ready" in line for line in lines):
        proc.kill()
        raise AssertionError(f"no readiness line; stderr so far: {lines}")
    return lines


@pytest.fixture
def image(tmp_path: Path, guest_dir: Path) -> Path:
    return overlay(guest_dir, tmp_path / "images" / "disk.qcow2")


def test_run_serves_http_and_stops_gracefully_on_sigint(
        tmp_path: Path, state_dir: Path, image: Path) -> None:
    port = free_port()
    job = job_file(tmp_path, str(image), port)
    proc = start_run(job, host_file(tmp_path, image.parent), state_dir)
    lines = wait_ready(proc)
    assert any(f"http host:{port}" in line for line in lines), lines
    resp = httpx.get(f"http://127.0.0.1:{port}/", timeout=20)
    assert "vmdriver-test-guest" in resp.text
    # Confined like a Nomad task, with headroom over the guest's 256 MiB (Nomad #27392),
    # in the cgroup vmdriver made for it and recorded (under this host's hierarchy).
    (pid,) = qemu_processes(str(state_dir))
    group, limit = memory_limit(pid)
    assert limit == cgroup.memory_limit_mib(256, 1, "tcg") * 2**20 > 512 * 2**20
    (rec,) = records_under(state_dir)
    assert str(group) in rec.cgroup_paths and group.parent.name == "vmdriver", (group, rec)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped on request" in err
    assert READY in out  # the serial console was shown live
    assert "powering off" in out


def test_stop_from_another_process(tmp_path: Path, state_dir: Path, image: Path) -> None:
    port = free_port()
    host = host_file(tmp_path, image.parent)
    proc = start_run(job_file(tmp_path, str(image), port), host, state_dir)
    wait_ready(proc)
    ps = vmdriver("ps", "--json", "--state-dir", str(state_dir), "--host-config", str(host))
    assert ps.returncode == 0 and '"running": true' in ps.stdout
    stop = vmdriver("stop", "vm", "--state-dir", str(state_dir), "--host-config", str(host))
    assert stop.returncode == 0, stop.stderr
    assert "stopped on request" in stop.stderr
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped on request" in err


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmdriver: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_missing_image_fails_before_launch(tmp_path: Path, state_dir: Path) -> None:
    job = job_file(tmp_path, "local/nope.qcow2", free_port())
    line = one_error_line(vmdriver("run", str(job), "--state-dir", str(state_dir)))
    assert "image file does not exist" in line and "local/nope.qcow2" in line
    assert "task 'vm'" in line
    assert not qemu_processes(str(state_dir))
    assert not list(state_dir.rglob("*.sock"))


def test_invalid_field_names_file_task_field_and_allowed(tmp_path: Path, state_dir: Path) -> None:
    job = job_file(tmp_path, "x.img", free_port(), 'drive_interface = "virtio-foo"')
    line = one_error_line(vmdriver("argv", str(job), "--state-dir", str(state_dir)))
    assert str(job) in line and "config.drive_interface" in line
    assert "virtio-foo" in line and "virtio" in line and "ide" in line


def test_missing_qemu_binary(tmp_path: Path, state_dir: Path, image: Path) -> None:
    job = job_file(tmp_path, str(image), free_port())
    env = {**os.environ, "PATH": str(tmp_path)}
    line = one_error_line(vmdriver("run", str(job), "--state-dir", str(state_dir),
                                   "--host-config", str(host_file(tmp_path, image.parent)),
                                   env=env))
    assert "qemu-system-x86_64" in line


def test_socket_path_too_long(tmp_path: Path, image: Path) -> None:
    deep = tmp_path / ("d" * 100)
    job = job_file(tmp_path, str(image), free_port())
    line = one_error_line(vmdriver("run", str(job), "--state-dir", str(deep),
                                   "--host-config", str(host_file(tmp_path, image.parent))))
    assert "socket path" in line and "107" in line
    assert not qemu_processes(str(deep))


def test_argv_prints_nomad_order(tmp_path: Path, state_dir: Path) -> None:
    job = job_file(tmp_path, "local/disk.qcow2", 18099)
    res = vmdriver("argv", str(job), "--state-dir", str(state_dir))
    assert res.returncode == 0, res.stderr
    argv = res.stdout.split()
    # Drives are -blockdev node graphs now, where Nomad's qemu driver had -drive.
    order = [argv.index(flag) for flag in ("-machine", "-name", "-m", "-blockdev", "-nographic",
                                           "-netdev")]
    assert order == sorted(order)
    assert "user,id=net0,hostfwd=udp::18099-:8080,hostfwd=tcp::18099-:8080" in argv
    assert any(a.startswith("virtio-net-pci,netdev=net0,") for a in argv), argv
