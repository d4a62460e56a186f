"""A vmdriver Supervisor driven over stdin/stdout, run inside a test's network namespace.

``ip netns exec NS python -m tests.netvm.server HOST_CONFIG_JSON`` reads one JSON
request per line and answers one JSON line each. The supervisor's networking
acts in this process's namespace, and QEMU and dnsmasq (forked from it) run
there too: the test process itself stays outside, as a Nomad client would be.

Requests (``op`` plus arguments):

- ``start`` ``vms``: ``[{id, nics, boot, agent}]`` → ``{"vms": [{id, pid, stdout}]}``
- ``addresses`` ``id``, ``wait`` → ``{"addresses": [...]}`` (waits for the first)
- ``exec`` ``id``, ``argv`` → ``{"code", "output"}`` (through the guest agent)
- ``stop`` / ``wait`` ``id`` → ``{"result"}``
- ``recover`` → ``{"ids": [...]}`` (every VM recorded under the state dir that still runs)
- ``close`` → the supervisor's own helpers stopped, then the process exits

Errors answer ``{"error": "<one line>", "type": "<class>"}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from vmdriver.errors import VmdriverError
from vmdriver.host.config import HostConfig
from vmdriver.runtime.request import LaunchRequest
from vmdriver.runtime.supervisor import Supervisor
from vmdriver.runtime.taskdir import TaskDir, VMDirs
from vmdriver.spec import Resources, ShutdownPolicy, VMSpec

#: The guest is booted from its kernel and initramfs (PVH, ~6 s under TCG).
GUEST_MEMORY_MIB = 192


def vm_spec(vm: dict[str, Any], guest: Path | None) -> VMSpec:
    """A VM on the given NICs: the test guest when ``boot``, else firmware only (no disk)."""
    args: tuple[str, ...] = ()
    if vm.get("boot") and guest is not None:
        args = ("-kernel", str(guest / "vmlinux"), "-initrd", str(guest / "initrd.img"),
                "-append", (guest / "cmdline").read_text().strip())
    return VMSpec.model_validate({
        "name": vm["id"].rsplit("/", 1)[-1], "nics": vm["nics"], "args": args,
        "guest_agent": bool(vm.get("agent")),
        "resources": Resources(memory_mib=GUEST_MEMORY_MIB),
        # The busybox guest powers off on the ACPI button within a second or two.
        "shutdown": ShutdownPolicy(graceful=bool(vm.get("boot")), timeout_s=20),
    })


class Server:
    def __init__(self, host: HostConfig, guest: Path | None) -> None:
        self.sup = Supervisor(host)
        self.host, self.guest = host, guest

    async def start(self, vms: list[dict[str, Any]]) -> dict[str, Any]:
        reqs = []
        for vm in vms:
            name = vm["id"].replace("/", "-")
            task = TaskDir(self.host.state_dir / "allocs" / name, name)
            reqs.append(LaunchRequest(vm_id=vm["id"], spec=vm_spec(vm, self.guest),
                                      dirs=VMDirs.under(self.host.state_dir, vm["id"], task)))
        infos = await self.sup.start_many(reqs)
        return {"vms": [{"id": i.id, "pid": i.pid, "stdout": str(i.stdout)} for i in infos]}

    async def addresses(self, id: str, wait: float) -> dict[str, Any]:
        return {"addresses": list(await self.sup.wait_addresses(id, wait))}

    async def exec(self, id: str, argv: list[str], timeout: float = 30) -> dict[str, Any]:
        agent = self.sup.agent(id)
        pid = await agent.exec(argv)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = await agent.exec_status(pid)
            if st.exited:
                return {"code": st.exit_code, "signal": st.signal,
                        "output": (st.stdout + st.stderr).decode(errors="replace")}
            await asyncio.sleep(0.3)
        raise TimeoutError(f"{argv} did not finish in {timeout}s")

    async def stop(self, id: str) -> dict[str, Any]:
        return {"result": (await self.sup.stop(id)).describe()}

    async def wait(self, id: str) -> dict[str, Any]:
        return {"result": (await self.sup.wait(id)).describe()}

    async def recover(self) -> dict[str, Any]:
        ids = []
        for rec, running in Supervisor.known(self.host.state_dir):
            if running:
                ids.append((await self.sup.recover(rec)).id)
        return {"ids": ids}

    async def close(self) -> dict[str, Any]:
        await self.sup.close()
        return {}


async def serve(server: Server) -> None:
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return
        req = json.loads(line)
        op = req.pop("op")
        try:
            reply = await getattr(server, op)(**req)
        except (VmdriverError, TimeoutError, OSError) as exc:
            reply = {"error": str(exc), "type": type(exc).__name__}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if op == "close":
            return


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = json.loads(sys.argv[1])
    guest = Path(cfg.pop("guest")) if cfg.get("guest") else None
    cfg.pop("guest", None)
    asyncio.run(serve(Server(HostConfig.model_validate(cfg), guest)))


if __name__ == "__main__":
    main()
