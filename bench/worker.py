"""A worker process holding one arm; the coordinator drives it with JSON lines.

Run as ``python -m bench.worker ARM ROOT`` (ARM: ``vmdriver``, jail off; ``vmdriver-jail``,
the default jail; or ``bare``).
Each stdin line is ``{"op": ..., ...}``; each answer is one stdout line of JSON.
An op that fails answers ``{"error": "..."}`` and the worker carries on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from bench.arms import Arm, BareArm, VmdriverArm
from bench.sampling import measure
from vmdriver.host.config import HostConfig


async def handle(arm: Arm, req: dict[str, Any]) -> dict[str, Any]:
    """Run one op."""
    op = req["op"]
    if op == "start":
        return await arm.start(int(req.get("n", 1)), str(req.get("kind", "tiny")))
    if op == "poweroff":
        return await arm.poweroff()
    if op == "kill":
        return await arm.kill()
    if op == "pss":
        return {"pss_kib": await arm.pss()}
    if op == "argv":
        return {"argv": arm.argv(), "jailed": arm.jailed()}
    if op == "scale":
        return await arm.scale(int(req["top"]), [int(c) for c in req["checkpoints"]])
    if op == "stats":
        return await measure(arm.pids(), int(req["ticks"]), float(req["interval"]))
    return {"error": f"unknown op {op!r}"}


async def serve(arm: Arm) -> None:
    """Answer requests until stdin closes or a ``quit`` op, then kill what is left."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            req = json.loads(line)
            if req.get("op") == "quit":
                break
            try:
                res = await handle(arm, req)
            except Exception as exc:  # one failed op must not end the run
                res = {"error": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(res) + "\n")
            sys.stdout.flush()
    finally:
        await arm.kill()


def main() -> None:
    """Entry point."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    kind, root = sys.argv[1], Path(sys.argv[2])
    arm: Arm
    if kind == "vmdriver":
        arm = VmdriverArm(root, jail="off")
    elif kind == "vmdriver-jail":
        arm = VmdriverArm(root, jail=str(HostConfig.model_fields["jail"].default))
    else:
        arm = BareArm(root)
    asyncio.run(serve(arm))


if __name__ == "__main__":
    main()
