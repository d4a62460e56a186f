"""What the supervisor holds for each VM it owns, and the snapshot of one a face sees.

:class:`Owned` is the supervisor's bookkeeping (the VM, its helpers, links and
jail, the task that cleans up after it); :class:`VMInfo` is what it hands out.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vmdriver.runtime.helpers import Helper
from vmdriver.runtime.jailing import Jail, JailRecord
from vmdriver.runtime.state import ExitResult, VMState
from vmdriver.runtime.vm import VM
from vmdriver.spec import MacvtapNic, TapNic, VMSpec

if TYPE_CHECKING:
    # Netlink and nftables load only for VMs with tap NICs.
    from vmdriver.runtime.networking import VmLinks


def has_taps(spec: VMSpec) -> bool:
    """Whether the VM has tap or macvtap NICs (and so needs the supervisor's networking)."""
    return any(isinstance(n, TapNic | MacvtapNic) for n in spec.nics)


@dataclass(frozen=True)
class VMInfo:
    """A VM as a face may see it."""

    id: str
    state: VMState
    pid: int | None
    accelerator: str
    stdout: Path
    stderr: Path
    result: ExitResult | None
    #: Unix time QEMU was launched.
    started_at: float
    qmp_socket: Path
    cgroup_paths: tuple[str, ...]
    warnings: tuple[str, ...]
    #: The guest's addresses on tap NICs, once found.
    addresses: tuple[str, ...] = ()


class Owned:
    """One VM and what the supervisor holds for it."""

    def __init__(self, vm: VM, helpers: list[Helper], accelerator: str,
                 warnings: tuple[str, ...] = (), links: VmLinks | None = None,
                 jail: Jail | None = None) -> None:
        self.vm, self.helpers, self.accelerator, self.warnings = vm, helpers, accelerator, warnings
        self.links = links
        self.jail: Jail | JailRecord | None = jail or vm.jail
        #: The guest's addresses once found (tap NICs), for Nomad's DriverNetwork and `ps`.
        self.addresses: tuple[str, ...] = ()
        self.finished: asyncio.Task[None] | None = None
