"""A VM QEMU cannot migrate (a device that blocks migration) is refused before it is paused."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.e2e.guest import request
from vmdriver.errors import SpecError
from vmdriver.host.config import HostConfig
from vmdriver.runtime.livemigrate import migrate_recorded
from vmdriver.runtime.snapshots import snapshot_recorded
from vmdriver.runtime.snapstore import SnapshotStore
from vmdriver.runtime.supervisor import Supervisor
from vmdriver.spec import ShutdownPolicy, VMSpec

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]


def test_unmigratable_vm_is_refused_and_runs_on(host: HostConfig) -> None:
    host = host.model_copy(update={"args_allowlist": ("-nodefaults", "-object", "-device")})
    # ivshmem in peer mode (its default) registers a migration blocker.
    spec = VMSpec(name="shm", args=("-nodefaults", "-object",
                                     "memory-backend-ram,id=m,size=1M,share=on", "-device",
                                     "ivshmem-plain,memdev=m"),
                  shutdown=ShutdownPolicy(timeout_s=2))

    async def main() -> None:
        sup = Supervisor(host)
        await sup.start(request(host, "r/shm", spec, None))
        try:
            with pytest.raises(SpecError, match=r"cannot save.*ivshmem"):
                await snapshot_recorded(sup.record("r/shm"), host, "never")
            assert SnapshotStore(host.state_dir).names() == []
            assert not (host.state_dir / "snapshots" / "never").exists()
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(str(host.state_dir / "m.sock"))
            listener.listen(1)
            try:
                with pytest.raises(SpecError, match="cannot migrate"):
                    await migrate_recorded(sup.record("r/shm"), host,
                                           f"unix:{host.state_dir}/m.sock")
            finally:
                listener.close()
                (host.state_dir / "m.sock").unlink()
            assert (await sup.qmp("r/shm", "query-status"))["status"] == "running"
        finally:
            await sup.stop_all(timeout=5)

    asyncio.run(main())
