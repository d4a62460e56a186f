"""What the snapshot tests do inside and around the test guest."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import httpx

from tests.e2e.guest import free_port, guest_spec
from vmdriver.qemu.agent import GuestAgent
from vmdriver.spec import VMSpec

#: A counter in guest RAM (/tmp is the initramfs): +1 every 0.2 s.
COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done"
#: Where the guest writes its disk marker: the last 4 KiB of the 17 MiB disk (unused by FAT).
MARK_OFFSET = 17825792 - 4096


def spec(name: str, port: int | None = None, **update: object) -> VMSpec:
    """The test guest with an agent, HTTP forwarded to ``port`` and a vmgenid device."""
    base = guest_spec(name, host_port=port or free_port(), guest_agent=True)
    return base.model_copy(update={"vmgenid": "auto", **update})


async def sh(agent: GuestAgent, script: str, *, wait: bool = True, timeout: float = 20) -> bytes:
    """Run a shell line in the guest; its stdout (or nothing, if not waited for)."""
    pid = await agent.exec(["/bin/sh", "-c", script], capture=wait)
    if not wait:
        return b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        st = await agent.exec_status(pid)
        if st.exited:
            assert st.exit_code == 0, (script, st)
            return st.stdout
        await asyncio.sleep(0.2)
    raise AssertionError(f"guest command did not finish: {script}")


async def start_counter(agent: GuestAgent) -> None:
    await sh(agent, f"({COUNTER}) >/dev/null 2>&1 &", wait=True)


async def counter(agent: GuestAgent) -> int:
    return int((await agent.read_file("/tmp/counter")).strip() or 0)


async def write_mark(agent: GuestAgent, text: str) -> None:
    """Write ``text`` to the guest's disk (raw, at MARK_OFFSET) and flush it."""
    await sh(agent, f"printf '%s' '{text}' | dd of=/dev/vda bs=4096 seek={MARK_OFFSET // 4096} "
                    "conv=notrunc,fsync 2>/dev/null; sync")


def read_mark(image: Path, length: int) -> bytes:
    """The marker as the host sees it in a (qcow2) image, through qemu-io."""
    out = subprocess.run(("qemu-io", "-r", "-f", "qcow2", "-c",
                          f"read -v {MARK_OFFSET} {length}", str(image)),
                         capture_output=True, text=True, check=True, timeout=30)
    data = b""
    for line in out.stdout.splitlines():
        addr, sep, rest = line.partition(":  ")
        if not sep or not all(c in "0123456789abcdef" for c in addr):
            continue
        # "00001000:  41 41 ... 41  AAAA": up to 16 hex bytes, then the text column.
        for token in rest.split(" ")[:16]:
            if len(token) != 2:
                break
            data += bytes.fromhex(token)
    return data[:length]


async def http_ok(port: int, timeout: float = 30) -> bool:
    async with httpx.AsyncClient() as client:
        resp = await client.get(f"http://127.0.0.1:{port}/", timeout=timeout)
    return resp.status_code == 200 and "vmdriver-test-guest" in resp.text
