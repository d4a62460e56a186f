"""Network namespaces for the networking tests: created, entered per thread, removed.

Nothing here touches the host's own interfaces: every link and address lives
in a namespace a test created, and removing the namespace removes them (and
its nftables tables) even if a test failed half-way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator

from pyroute2.netns import popns, pushns  # type: ignore[import-untyped]


def unique(prefix: str) -> str:
    """A namespace name no other run uses at the same time."""
    return f"{prefix}{os.getpid() % 100000}{uuid.uuid4().hex[:4]}"


def ip(*args: str, ns: str | None = None) -> str:
    """Run ``ip`` (fixtures only: the library itself never does)."""
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def create(name: str) -> None:
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", ns=name)


def pids(name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], check=False, capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def remove(name: str) -> None:
    """Kill what still runs in the namespace (processes this test started), then delete it."""
    for _ in range(50):
        left = pids(name)
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@contextlib.contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the body with this thread in namespace ``name`` (children forked here too)."""
    pushns(name)
    try:
        yield
    finally:
        popns()


def in_ns(name: str, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run a command in a namespace (curl from a client namespace)."""
    return subprocess.run(["ip", "netns", "exec", name, *argv], check=False, capture_output=True,
                          text=True, timeout=timeout)


def veth(a_ns: str, a_name: str, b_ns: str, b_name: str) -> None:
    """A veth pair with one end in each namespace, both up."""
    ip("link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b_ns, ns=a_ns)
    ip("link", "set", a_name, "up", ns=a_ns)
    ip("link", "set", b_name, "up", ns=b_ns)
