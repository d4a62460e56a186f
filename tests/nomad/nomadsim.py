"""A stand-in for Nomad's client: launches the plugin the way go-plugin does and talks to it.

Only what Nomad itself does: environment with the magic cookie, one handshake
line read from stdout, gRPC over the advertised unix socket, configs encoded as
go-cty msgpack, log FIFOs read like logmon reads them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import msgpack

from vmdriver.nomad.proto import (
    base_pb2,
    base_pb2_grpc,
    driver_pb2_grpc,
    hclspec_pb2,
    health_pb2_grpc,
    plugin_pb2,
    plugin_pb2_grpc,
    status_pb2,
    structs_pb2,
)

COOKIE = ("NOMAD_PLUGIN_MAGIC_COOKIE",
          "e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255")
REPO = Path(__file__).resolve().parents[2]


def nomad_env() -> dict[str, str]:
    """The plugin's environment as go-plugin builds it for Nomad."""
    env = dict(os.environ)
    env.update({COOKIE[0]: COOKIE[1], "PLUGIN_MIN_PORT": "10000", "PLUGIN_MAX_PORT": "25000",
                "PLUGIN_PROTOCOL_VERSIONS": "2"})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def install_launcher(plugin_dir: Path, name: str) -> Path:
    """An executable named ``name`` in ``plugin_dir``, like the console script a user copies."""
    plugin_dir.mkdir(parents=True, exist_ok=True)
    path = plugin_dir / name
    path.write_text(f"#!{sys.executable}\nimport sys\nfrom vmdriver.nomad.server import main\n"
                    "sys.exit(main())\n")
    path.chmod(0o755)
    return path


# Section: go-cty msgpack


def cty_value(value: Any) -> Any:
    """A Python value the way go-cty marshals it (Decimal that is not a float64 → string)."""
    if isinstance(value, Decimal):
        as_float = float(value)
        if value == value.to_integral_value() and abs(value) < 2**63:
            return int(value)
        return as_float if Decimal(as_float) == value else format(value, "f")
    if isinstance(value, Mapping):
        return {k: cty_value(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [cty_value(v) for v in value]
    return value


def cty_msgpack(config: Mapping[str, Any], spec: hclspec_pb2.Spec) -> bytes:
    """Encode ``config`` against an Object ``spec`` as Nomad does.

    Every attribute of the spec is present (nil when unset), keys sorted, ints in
    their smallest encoding, floats as float64. Keys not in the spec are kept,
    so a test can send what hcldec would have refused.
    """
    names = set(spec.object.attributes) | set(config)
    obj = {name: cty_value(config.get(name)) for name in sorted(names)}
    return bytes(msgpack.packb(obj, use_bin_type=True, use_single_float=False))


# Section: logmon


class FifoReader:
    """Nomad's logmon in miniature: create a FIFO, copy whatever arrives into a file."""

    def __init__(self, fifo: Path, out: Path) -> None:
        self.fifo, self.out = fifo, out
        fifo.parent.mkdir(parents=True, exist_ok=True)
        if not fifo.exists():
            os.mkfifo(fifo, 0o600)
        self._stop = threading.Event()
        self._fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.out.open("ab") as f:
            while not self._stop.is_set():
                try:
                    data = os.read(self._fd, 65536)
                except BlockingIOError:
                    data = b""
                if data:
                    f.write(data)
                    f.flush()
                else:
                    time.sleep(0.05)

    def text(self) -> str:
        """Everything read so far."""
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def wait_for(self, needle: str, timeout: float) -> str:
        """Block until ``needle`` appears; AssertionError with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in (text := self.text()):
                return text
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not in {self.fifo} after {timeout}s: {self.text()[-2000:]}")

    def close(self) -> None:
        """Stop reading."""
        self._stop.set()
        self._thread.join(2)
        with contextlib.suppress(OSError):
            os.close(self._fd)


# Section: the plugin process


@dataclass
class Handshake:
    core: str
    app: str
    network: str
    address: str
    protocol: str
    cert: str


class Plugin:
    """One plugin process and gRPC stubs for every service Nomad calls."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None,
                 timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(argv, env=env or nomad_env(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stderr_lines: list[str] = []
        self._drains = [threading.Thread(target=self._drain_stderr, daemon=True)]
        self._drains[0].start()
        self.first_line = self._read_line(timeout)
        parts = self.first_line.strip().split("|")
        assert len(parts) >= 6, f"bad handshake line {self.first_line!r}; stderr: {self.stderr()}"
        self.handshake = Handshake(*parts[:6])
        self.extra_stdout: list[bytes] = []
        self._drains.append(threading.Thread(target=self._drain_stdout, daemon=True))
        self._drains[-1].start()
        self.channel = grpc.insecure_channel(f"unix:{self.handshake.address}")
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.base = base_pb2_grpc.BasePluginStub(self.channel)
        self.driver = driver_pb2_grpc.DriverStub(self.channel)
        self.controller = plugin_pb2_grpc.GRPCControllerStub(self.channel)
        self.stdio = plugin_pb2_grpc.GRPCStdioStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def _read_line(self, timeout: float) -> str:
        box: list[bytes] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        if not box:
            self.proc.kill()
            raise AssertionError(f"no handshake within {timeout}s; stderr: {self.stderr()}")
        return box[0].decode()

    def _drain_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.extra_stdout.append(line)

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line.decode(errors="replace"))

    def stderr(self) -> str:
        """What the plugin logged so far."""
        return "".join(self.stderr_lines)

    def configure(self, config: Mapping[str, Any]) -> None:
        """ConfigSchema then SetConfig, as the agent does at start."""
        schema = self.base.ConfigSchema(base_pb2.ConfigSchemaRequest(), timeout=10).spec
        self.base.SetConfig(base_pb2.SetConfigRequest(
            msgpack_config=cty_msgpack(config, schema), plugin_api_version="v0.1.0",
            nomad_config=base_pb2.NomadConfig(driver=base_pb2.NomadDriverConfig(
                ClientMinPort=14000, ClientMaxPort=14512)),
        ), timeout=10)

    def kill9(self) -> None:
        """SIGKILL the plugin process only (its children stay)."""
        self.proc.kill()
        self.proc.wait(5)
        self._release()

    def _release(self) -> None:
        self.channel.close()
        for t in self._drains:
            t.join(2)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def close(self) -> None:
        """Kill() as go-plugin does: Controller.Shutdown, 2 s grace, then SIGKILL."""
        if self.proc.poll() is None:
            with contextlib.suppress(grpc.RpcError):
                self.controller.Shutdown(plugin_pb2.Empty(), timeout=2)
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._release()


def status_details(err: grpc.RpcError) -> tuple[str, bool | None]:
    """(message, recoverable) of an error, as Nomad's client reads it."""
    recoverable = None
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            st = status_pb2.Status.FromString(value)
            detail = structs_pb2.RecoverableError()
            if st.details and st.details[0].Unpack(detail):
                recoverable = detail.recoverable
    return err.details(), recoverable


def stream_first(it: Iterator[Any], timeout: float) -> Any:
    """The first message of a server stream within ``timeout`` seconds."""
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(next(it)), daemon=True)
    t.start()
    t.join(timeout)
    assert box, f"no message within {timeout}s"
    return box[0]
