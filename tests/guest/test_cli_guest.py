"""`vmdriver exec`, `vmdriver signal` and `vmdriver run --metrics` as a user runs them.

One `vmdriver run` of the test guest (agent, balloon) serves the module; exec and
signal are separate processes that find it through the state dir's records.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import qemu_processes
from tests.e2e.guest import free_port, stderr_until

pytestmark = pytest.mark.e2e
VMDRIVER = str(Path(sys.executable).with_name("vmdriver"))


@dataclass
class Run:
    proc: subprocess.Popen[str]
    state: Path
    metrics: str
    lines: list[str]

    def vmdriver(self, *args: str, stdin: str | None = None,
                 ) -> subprocess.CompletedProcess[str]:
        cmd, rest = args[0], args[1:]
        return subprocess.run((VMDRIVER, cmd, "--state-dir", str(self.state), *rest),
                              input=stdin if stdin is not None else "", capture_output=True,
                              text=True, timeout=120, check=False)


def job_file(tmp: Path, image: Path) -> Path:
    path = tmp / "job.nomad.hcl"
    path.write_text(f"""
job "gx" {{
  group "g" {{
    network {{
      port "http" {{
        static = {free_port()}
      }}
    }}
    task "vm" {{
      driver = "qemu"
      config {{
        image_path           = "{image}"
        drive_interface      = "virtio"
        graceful_shutdown    = true
        guest_agent          = true
        guest_agent_shutdown = true
        balloon              = true
        port_map {{
          http = 8080
        }}
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


@pytest.fixture(scope="module")
def run(guest_dir: Path) -> Iterator[Run]:
    tmp = Path(tempfile.mkdtemp(prefix="vgc-", dir="/tmp"))
    state = tmp / "s"
    images = tmp / "img"
    images.mkdir()
    shutil.copyfile(guest_dir / "disk.qcow2", images / "disk.qcow2")
    host = tmp / "host.hcl"
    host.write_text(f'image_paths = ["{images}"]\n')
    metrics = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        (VMDRIVER, "run", str(job_file(tmp, images / "disk.qcow2")), "--host-config", str(host),
         "--state-dir", str(state), "--quiet", "--metrics", metrics),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = stderr_until(proc, "guest agent connected", 180)
        assert any("guest agent connected" in line for line in lines), lines
        yield Run(proc, state, metrics, lines)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
        leaked = qemu_processes(str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
    assert not leaked, f"QEMU processes left behind: {sorted(leaked)}"


def test_run_prints_guest_events(run: Run) -> None:
    text = "".join(run.lines)
    assert f"metrics on http://{run.metrics}/metrics" in text
    assert "task 'vm': guest ready" in text and "task 'vm': guest agent connected" in text
    more = stderr_until(run.proc, "IP known", 30)
    run.lines += more
    assert any("IP known: 10.0.2.15" in line for line in more), more


def test_exec_stdin_stdout_stderr_exit_code(run: Run) -> None:
    got = run.vmdriver("exec", "vm", "--", "sh", "-c", 'read l; echo "got $l"; echo oops >&2; exit 5',
                       stdin="hi\n")
    assert (got.returncode, got.stdout, got.stderr) == (5, "got hi\n", "oops\n"), got


def test_exec_streams_before_the_end(run: Run) -> None:
    with subprocess.Popen(
        (VMDRIVER, "exec", "--state-dir", str(run.state), "--no-stdin", "vm", "--",
         "sh", "-c", "echo one; sleep 2; echo two"),
        stdout=subprocess.PIPE, text=True,
    ) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        t_first = time.monotonic()
        second = proc.stdout.readline()
        t_second = time.monotonic()
        assert proc.wait(30) == 0
    assert (first, second) == ("one\n", "two\n")
    assert t_second - t_first > 1.5


def test_exec_timeout_and_unknown_task(run: Run) -> None:
    t0 = time.monotonic()
    got = run.vmdriver("exec", "--timeout", "2", "vm", "--", "sleep", "60")
    assert got.returncode == 124 and "longer than 2s and was killed" in got.stderr, got
    assert time.monotonic() - t0 < 20
    missing = run.vmdriver("exec", "nosuch", "--", "true")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing
    assert "no running VM matches" in missing.stderr


def test_signal_a_named_process(run: Run) -> None:
    run.vmdriver("exec", "vm", "--", "sh", "-c", "sleep 1002 </dev/null >/dev/null 2>&1 &")
    got = run.vmdriver("signal", "vm", "SIGKILL", "--process", "sleep")
    assert got.returncode == 0 and "SIGKILL sent to 1 guest process" in got.stderr, got
    assert "sleep 1002" not in run.vmdriver("exec", "vm", "--", "ps").stdout
    none = run.vmdriver("signal", "vm", "HUP", "--process", "no-such-daemon")
    assert none.returncode == 2 and "no process with this name" in none.stderr, none


def test_metrics_scraped(run: Run) -> None:
    deadline = time.monotonic() + 30
    while True:
        text = urllib.request.urlopen(f"http://{run.metrics}/metrics", timeout=5).read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}
        mem = [v for (n, lb), v in samples.items()
               if n == "vmdriver_guest_memory_bytes" and ("kind", "available") in lb]
        if mem or time.monotonic() > deadline:
            break
        time.sleep(1)
    state = [v for (n, lb), v in samples.items() if n == "vmdriver_vm_state" and ("task", "vm") in lb]
    assert state == [2.0]
    assert mem and 50 << 20 < mem[0] < 256 << 20


def test_sigterm_powers_the_guest_off(run: Run) -> None:
    """Last: `vmdriver signal vm SIGTERM` ends the run as a guest power-off (exit 0)."""
    got = run.vmdriver("signal", "vm", "SIGTERM")
    assert got.returncode == 0 and "asked the guest to shut down" in got.stderr, got
    rest = run.proc.communicate(timeout=90)[1]
    assert run.proc.returncode == 0, rest
    assert "guest powered off" in rest
