"""Attack tables: each case asserts the effect did not happen on the host, not only an error."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest


@dataclass
class Canary:
    """A secret file planted on the host, with its state before the attack."""

    path: Path
    content: bytes = b"host-secret-canary\n"
    mtime: float = 0.0

    def plant(self) -> Canary:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(self.content)
        self.mtime = self.path.stat().st_mtime
        return self

    def untouched(self) -> bool:
        return (self.path.exists() and self.path.read_bytes() == self.content
                and self.path.stat().st_mtime == self.mtime)


@pytest.fixture
def canary(tmp_path: Path) -> Canary:
    return Canary(tmp_path / "host" / "secret.txt").plant()


@dataclass
class Listener:
    """A local HTTP server that records every request that reaches it."""

    port: int
    hits: list[str] = field(default_factory=list)


@pytest.fixture
def listener() -> Iterator[Listener]:
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x")

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield Listener(srv.server_address[1], hits)
    finally:
        srv.shutdown()
        srv.server_close()


def qemu_pids() -> set[int]:
    """QEMU processes running now (to show an attack started none)."""
    out = set()
    for p in psutil.process_iter(["name"]):
        if (p.info["name"] or "").startswith("qemu-system"):
            out.add(p.pid)
    return out


def listening_ports() -> set[int]:
    """TCP ports listening on this host now."""
    return {int(getattr(c.laddr, "port", 0)) for c in psutil.net_connections("tcp")
            if c.status == "LISTEN"}


@dataclass
class Cli:
    """`vmdriver run` on a job file in a scratch state dir, in-process."""

    root: Path

    def run(self, job: str, host: str = "", command: str = "run") -> tuple[int, str]:
        import contextlib
        import io

        from vmdriver.cli.main import main

        (self.root / "jobs").mkdir(exist_ok=True)
        path = self.root / "jobs" / "job.hcl"
        path.write_text(job)
        host_file = self.root / "host.hcl"
        host_file.write_text(f'state_dir = "{self.root / "state"}"\n{host}')
        err, out = io.StringIO(), io.StringIO()
        argv = [command, str(path), "--host-config", str(host_file)]
        if command == "run":
            argv.append("--quiet")
        if command == "argv-json":  # stdout is the answer
            argv[0] = "argv"
            argv.append("--json")
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            status = main(argv)
        return status, out.getvalue() if command == "argv-json" and status == 0 \
            else err.getvalue()

    def qemus(self) -> list[int]:
        """QEMU processes started for this state dir."""
        out = []
        for p in psutil.process_iter(["name", "cmdline"]):
            if (p.info["name"] or "").startswith("qemu") and \
                    str(self.root) in " ".join(p.info["cmdline"] or ()):
                out.append(p.pid)
        return out


@pytest.fixture
def cli() -> Iterator[Cli]:
    # Short: the runtime dir's socket paths must fit 107 bytes.
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="vsec", dir="/tmp"))
    try:
        yield Cli(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def qemu_job(config: str = "", task: str = "t", extra: str = "", group: str = "g",
             job: str = "j") -> str:
    """A qemu task whose image is a tiny raw file next to the job (an artifact)."""
    return f'''
job "{job}" {{
  group "{group}" {{
    task "{task}" {{
      driver = "qemu"
      config {{
        image_path = "local/disk.img"
        {config}
      }}
      {extra}
    }}
  }}
}}
'''


#: What a refusal by policy (not by some unrelated failure) says.
POLICY_WORDS = ("not in the safe set", "outside the allowed dirs", "climbs out", "refused",
                "not allowed", "protocol", "block driver", "should match pattern",
                "emulator must be", "input should be", "more memory", "more vCPUs",
                "not a valid name", "more cores", "too many ports", "mem-lock",
                "args_allowlist")


def refused_cleanly(status: int, err: str, *words: str) -> None:
    """One line, exit 2, no traceback, and refused by policy (``words``, or any policy word)."""
    lines = [line for line in err.splitlines() if line.strip() and "vmdriver: error" in line]
    assert status == 2, err[-800:]
    assert "Traceback" not in err and len(lines) == 1, err[-800:]
    assert any(w in lines[0] for w in (words or POLICY_WORDS)), lines[0]
