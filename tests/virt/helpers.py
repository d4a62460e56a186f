"""Helpers of the virt face's tests: job and host files, `vmdriver run` processes, the guest agent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.conftest import qemu_processes
from vmdriver.qemu.agent import GuestAgent

VMDRIVER = str(Path(sys.executable).with_name("vmdriver"))
READY = "VMDRIVER-GUEST-READY"


def host_file(directory: Path, pool: Path, image_paths: tuple[Path, ...] = (),
              extra: str = "") -> Path:
    """A host config: TCG for virt tasks, one directory pool, ``image_paths``."""
    paths = ", ".join(f'"{p}"' for p in image_paths)
    path = directory / "host.hcl"
    path.write_text(f"""
image_paths      = [{paths}]
virt_accelerator = "tcg"
storage_pools {{
  directory "local" {{
    path = "{pool}"
  }}
}}
{extra}
""")
    return path


def job_file(directory: Path, config: str, *, name: str = "vm", network: str = "",
             task_extra: str = "", memory: int = 256) -> Path:
    """A job with one virt task whose ``config {}`` body is ``config``."""
    path = directory / "job.nomad.hcl"
    path.write_text(f"""
job "virt-test" {{
  group "g" {{
    {network}
    task "{name}" {{
      driver = "virt"
      config {{
        {config}
      }}
      resources {{
        memory = {memory}
      }}
      kill_timeout = "20s"
      {task_extra}
    }}
  }}
}}
""")
    return path


def volumes(pool: Path) -> list[str]:
    """Volume files in a directory pool (its own metadata dir left out)."""
    return sorted(p.name for p in pool.iterdir() if p.name != ".vmdriver") if pool.exists() else []


def bases(pool: Path) -> list[str]:
    """Chained volumes' shared bases in a directory pool."""
    d = pool / ".vmdriver" / "bases"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@dataclass
class Run:
    """A `vmdriver run` in the background."""

    proc: subprocess.Popen[str]
    state: Path
    stderr: list[str]

    def wait_for(self, word: str, timeout: float) -> list[str]:
        """stderr lines up to the first one holding ``word`` (AssertionError if it never comes)."""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.stderr.append(line)
            if word in line:
                return self.stderr
        raise AssertionError(f"{word!r} not in the output of vmdriver run: {''.join(self.stderr)}")

    def qga(self) -> Path:
        """The guest agent socket of the run's only VM."""
        socks = list((self.state / "run").rglob("qga.sock"))
        assert len(socks) == 1, socks
        return socks[0]

    def stop(self, timeout: float = 90) -> int:
        """`vmdriver stop --all` on the run's state dir; the run's exit status."""
        subprocess.run((VMDRIVER, "stop", "--all", "--state-dir", str(self.state)),
                       capture_output=True, text=True, timeout=timeout, check=False)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self.stderr.append(err)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the run's process group (cleanup after a failed test)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def start_run(job: Path, host: Path, state: Path, *extra: str) -> Run:
    """`vmdriver run JOB --ready READY --quiet`, in its own process group."""
    proc = subprocess.Popen(
        (VMDRIVER, "run", str(job), "--host-config", str(host), "--state-dir", str(state),
         "--ready", READY, "--quiet", *extra),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return Run(proc, state, [])


@contextlib.contextmanager
def running(job: Path, host: Path, state: Path, *extra: str) -> Iterator[Run]:
    """A run that is killed (with its VMs) if the block fails."""
    run = start_run(job, host, state, *extra)
    try:
        yield run
    finally:
        if run.proc.poll() is None:
            with contextlib.suppress(Exception):
                run.stop(timeout=60)
        run.kill()
        for pid in qemu_processes(str(state)):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def agent_read(sock: Path, path: str) -> bytes:
    """A guest file through qemu-ga."""
    return asyncio.run(GuestAgent(sock).read_file(path))


def agent_sh(sock: Path, script: str, timeout: float = 30) -> tuple[int, str, str]:
    """``sh -c script`` in the guest through qemu-ga: (exit code, stdout, stderr)."""
    async def go() -> tuple[int, str, str]:
        agent = GuestAgent(sock)
        pid = await agent.exec(["/bin/sh", "-c", script])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = await agent.exec_status(pid)
            if st.exited:
                return st.exit_code or 0, st.stdout.decode(), st.stderr.decode()
            await asyncio.sleep(0.2)
        raise TimeoutError(script)

    return asyncio.run(go())
