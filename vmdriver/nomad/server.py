"""The plugin process: go-plugin handshake, the gRPC server, and a clean exit.

Nomad runs the executable from its ``plugin_dir`` with the magic cookie in the
environment, reads exactly one line from its stdout::

    1|2|unix|/tmp/vmdriver-plugin-XXXX/plugin.sock|grpc|

and talks gRPC on that socket from then on. Nothing else may ever reach
stdout; logs go to stderr as hclog JSON. The driver name is the executable's
file name (``vmdriver``, ``qemu``, ``virt``), so one install can stand in for
Nomad's built-in qemu driver or for the virt driver.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from vmdriver.nomad import hclog
from vmdriver.nomad.base import BasePluginService, PluginState
from vmdriver.nomad.driver import DriverService
from vmdriver.nomad.proto import (
    base_pb2_grpc,
    driver_pb2_grpc,
    health_pb2,
    health_pb2_grpc,
    plugin_pb2,
    plugin_pb2_grpc,
)

log = logging.getLogger(__name__)

MAGIC_COOKIE_KEY = "NOMAD_PLUGIN_MAGIC_COOKIE"
MAGIC_COOKIE_VALUE = "e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255"
CORE_PROTOCOL_VERSION = 1
APP_PROTOCOL_VERSION = 2
#: Threads for handlers. Each open stream holds one for its whole life: Nomad keeps
#: StreamStdio, Fingerprint and TaskEvents open, plus WaitTask and TaskStats per task.
MAX_WORKERS = int(os.environ.get("VMDRIVER_PLUGIN_THREADS", "512"))
DEFAULT_NAME = "vmdriver"


class HealthService(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health``: "plugin" (and the server as a whole) is SERVING."""

    def Check(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        """SERVING for "plugin" and ""; SERVICE_UNKNOWN otherwise."""
        ok = request.service in ("", "plugin")
        status = (health_pb2.HealthCheckResponse.SERVING if ok
                  else health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext) -> Iterator[health_pb2.HealthCheckResponse]:
        """The status once; it never changes while the server runs."""
        yield self.Check(request, context)
        ended = threading.Event()
        context.add_callback(ended.set)
        ended.wait()


class StdioService(plugin_pb2_grpc.GRPCStdioServicer):
    """``plugin.GRPCStdio``: held open and silent (nothing but the handshake uses stdout)."""

    def StreamStdio(self, request: empty_pb2.Empty,
                    context: grpc.ServicerContext) -> Iterator[plugin_pb2.StdioData]:
        """Stay open until the host hangs up."""
        ended = threading.Event()
        context.add_callback(ended.set)
        ended.wait()
        yield from ()


class ControllerService(plugin_pb2_grpc.GRPCControllerServicer):
    """``plugin.GRPCController``: the host asks the plugin to exit."""

    def __init__(self, state: PluginState) -> None:
        self.state = state

    def Shutdown(self, request: plugin_pb2.Empty,
                 context: grpc.ServicerContext) -> plugin_pb2.Empty:
        """Exit soon (the host SIGKILLs us after 2 s); VMs keep running."""
        log.info("host asked the plugin to shut down")
        self.state.shutdown.set()
        return plugin_pb2.Empty()


def driver_name(argv0: str) -> str:
    """The driver name: the executable's file name, ``vmdriver`` for the `vmdriver` command."""
    name = Path(argv0).name
    for suffix in (".py", ".exe"):
        name = name.removesuffix(suffix)
    if name in ("", "__main__", "python", "python3", "vmdriver-nomad"):
        return DEFAULT_NAME
    return name


def build_server(state: PluginState, address: str) -> grpc.Server:
    """One gRPC server with every service the host may call."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="rpc"),
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 2**31 - 1),
                 ("grpc.max_send_message_length", 2**31 - 1)],
    )
    health_pb2_grpc.add_HealthServicer_to_server(HealthService(), server)
    plugin_pb2_grpc.add_GRPCStdioServicer_to_server(StdioService(), server)
    plugin_pb2_grpc.add_GRPCControllerServicer_to_server(ControllerService(state), server)
    base_pb2_grpc.add_BasePluginServicer_to_server(BasePluginService(state), server)
    driver_pb2_grpc.add_DriverServicer_to_server(DriverService(state), server)
    server.add_insecure_port(address)
    return server


def serve(name: str, *, log_level: int = logging.INFO) -> int:
    """Check the cookie, serve on a private unix socket, print the handshake, run until told to stop."""
    if os.environ.get(MAGIC_COOKIE_KEY) != MAGIC_COOKIE_VALUE:
        sys.stderr.write(
            "This is a Nomad task driver plugin: Nomad's client starts it from its plugin_dir\n"
            f"(see docs/nomad.md). It is not meant to be run by hand ({MAGIC_COOKIE_KEY} is\n"
            "not set). To run a job file locally, use `vmdriver run JOB.hcl`.\n"
        )
        return 1
    # Ctrl-C on a foreground agent goes to the whole process group; the agent decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    hclog.setup(log_level)
    # `kill -USR1 <pid>` dumps every thread's stack to stderr (the agent log), for debugging.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    sock_dir = Path(tempfile.mkdtemp(prefix="vmdriver-plugin-"))
    sock = sock_dir / "plugin.sock"
    state = PluginState(name)
    server = build_server(state, f"unix:{sock}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: state.shutdown.set())
    sys.stdout.write(f"{CORE_PROTOCOL_VERSION}|{APP_PROTOCOL_VERSION}|unix|{sock}|grpc|\n")
    sys.stdout.flush()
    log.info("plugin %r serving on %s (pid %d)", name, sock, os.getpid())
    try:
        state.shutdown.wait()
    finally:
        # VMs stay up: a new plugin process re-attaches to them with RecoverTask.
        try:
            state.loop.call(state.tasks.detach_all(), timeout=1.5)
        except Exception as exc:
            log.warning("detaching from VMs failed: %s", exc)
        server.stop(grace=0.2).wait(1.0)
        state.loop.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
        log.info("plugin %r exited", name)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the plugin executable (``vmdriver-nomad``, or a copy named for the driver)."""
    args = list(sys.argv if argv is None else argv)
    name = driver_name(args[0] if args else DEFAULT_NAME)
    # Nomad's plugin block may pass `args = ["--name", "qemu"]` instead of a renamed copy.
    if "--name" in args[1:-1]:
        name = args[args.index("--name", 1) + 1]
    return serve(name)


if __name__ == "__main__":
    sys.exit(main())
