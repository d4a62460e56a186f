"""The coordinator's side: worker processes and `vmdriver run` as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import BOOT_MIB, GUEST, READY, REPO


class WorkerError(RuntimeError):
    """A worker answered with an error or died."""


class Worker:
    """One ``python -m bench.worker ARM ROOT`` process."""

    def __init__(self, arm: str, proc: asyncio.subprocess.Process) -> None:
        self.arm = arm
        self._proc = proc

    @classmethod
    async def open(cls, arm: str, root: Path) -> Worker:
        """Start the worker for ``arm`` with its VMs under ``root``."""
        await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.worker", arm, str(root), cwd=REPO, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=1 << 24,
        )
        return cls(arm, proc)

    async def call(self, op: str, timeout: float = 120.0, **args: Any) -> dict[str, Any]:
        """Send one op and wait for its answer; :class:`WorkerError` on an error answer."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        await self._proc.stdin.drain()
        line = await asyncio.wait_for(self._proc.stdout.readline(), timeout)
        if not line:
            raise WorkerError(f"{self.arm} worker exited (status {await self._proc.wait()})")
        res: dict[str, Any] = json.loads(line)
        if "error" in res:
            raise WorkerError(f"{self.arm} {op}: {res['error']}")
        return res

    async def close(self) -> None:
        """Ask the worker to kill its VMs and exit."""
        if self._proc.returncode is not None:
            return
        assert self._proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._proc.stdin.write(b'{"op": "quit"}\n')
            await self._proc.stdin.drain()
            self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), 30)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()


JOB_HCL = """\
job "bench" {{
  group "g" {{
    task "t" {{
      driver = "qemu"
      kill_timeout = "30s"
      config {{
        image_path = "{image}"
        accelerator = "tcg"
        graceful_shutdown = true
      }}
      resources {{
        memory = {mib}
      }}
    }}
  }}
}}
"""

_READY_STATUS = re.compile(rb"task .* ready")


def _cli_files(root: Path, image: Path) -> tuple[Path, Path, list[str]]:
    """The job file, the host config and the `vmdriver` command line of :func:`cli_boot`."""
    root.mkdir(parents=True, exist_ok=True)
    job = root / "job.hcl"
    job.write_text(JOB_HCL.format(image=image, mib=BOOT_MIB))
    host = root / "host.hcl"
    # The overlay's backing file is the built guest (guest/out links into a cache dir).
    host.write_text(f'image_paths = ["{image.parent}", "{GUEST.resolve()}"]\n')
    vmdriver = Path(sys.executable).parent / "vmdriver"
    argv = [str(vmdriver)] if vmdriver.exists() else [sys.executable, "-m", "vmdriver.cli.main"]
    return job, host, argv


async def cli_boot(root: Path, image: Path, timeout: float = 180.0) -> tuple[float, float]:
    """`vmdriver run JOB --ready ...` as a user runs it: seconds to the ready status, then to exit.

    The second figure is the CLI's graceful stop on SIGINT (ACPI button, guest
    powers off, QEMU exits, `run` returns).
    """
    job, host, argv = await asyncio.to_thread(_cli_files, root, image)
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, "run", str(job), "--ready", READY, "--quiet", "--state-dir", str(root / "state"),
        "--host-config", str(host), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=root,
    )
    assert proc.stderr is not None
    seen: list[bytes] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                line = await proc.stderr.readline()
                if not line:
                    raise WorkerError(f"vmdriver run exited before ready: {b''.join(seen[-3:]).decode()!r}")
                seen.append(line)
                if _READY_STATUS.search(line):
                    ready = time.perf_counter() - t0
                    break
        t1 = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            await proc.stderr.read()
            await proc.wait()
        return ready, time.perf_counter() - t1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
