"""Two namespaces' macvtaps with the same ifindex want the same /dev/tapN node:
each still gets its own link's fd (a private node made from its device numbers)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.network import netns

_HOLDER = """
import sys
from vmdriver.network.macvtap import create_macvtap
from vmdriver.network.tap import tap_flags
tap = create_macvtap("mvclash" + sys.argv[1], "v0", mac="52:54:00:aa:bb:0%s" % sys.argv[1])
print(tap.ifindex, tap_flags(tap.fds[0])[0], flush=True)
sys.stdin.read()
"""


@pytest.fixture
def two() -> Iterator[tuple[str, str]]:
    names = (netns.unique("vmdcx"), netns.unique("vmdcy"))
    try:
        for name in names:
            netns.create(name)
            netns.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1", ns=name)
            netns.ip("link", "set", "v0", "up", ns=name)
        yield names
    finally:
        for name in names:
            netns.remove(name)


def test_same_ifindex_in_two_namespaces_each_gets_its_own_link(two: tuple[str, str]) -> None:
    holders = []
    try:
        seen = []
        for i, ns in enumerate(two):
            proc = subprocess.Popen(("ip", "netns", "exec", ns, sys.executable, "-c", _HOLDER,
                                     str(i)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            holders.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline().split()
            assert line, proc.stderr.read() if proc.stderr else "no output"
            seen.append((int(line[0]), line[1]))
        # The same ifindex (so the same /dev/tapN name), and each fd is its own link's
        # (the second namespace's /dev/tapN is the first one's device).
        assert seen[0][0] == seen[1][0], seen
        assert [name for _, name in seen] == ["mvclash0", "mvclash1"]
    finally:
        for proc in holders:
            proc.communicate(timeout=10)
