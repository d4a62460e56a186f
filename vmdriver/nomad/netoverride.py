"""A VM's guest address as Nomad's DriverNetwork (StartTaskResponse.network_override).

A VM on a tap or macvtap NIC has an address of its own. StartTask waits for it
up to the host config's ``address_wait`` (default 30 s) and hands it to Nomad
with the port map (label → guest port) and ``AutoAdvertise``, so services with
``address_mode = "driver"`` (or "auto") register the guest's address. Without an
address by then the task starts anyway, and a task event says so. Later changes
of the guest's addresses are task events too. User-mode VMs have no address of
their own: Nomad advertises the host's, as for any port-mapped task.
"""

from __future__ import annotations

import ipaddress
import logging

from vmdriver.nomad.proto import driver_pb2 as pb
from vmdriver.nomad.tasks import EventHub, Task
from vmdriver.runtime.guest_stats import spec_of
from vmdriver.runtime.supervisor import Supervisor
from vmdriver.spec import MacvtapNic, TapNic, VMSpec

log = logging.getLogger(__name__)


def has_own_address(spec: VMSpec) -> bool:
    """True if the VM sits on a host network (tap or macvtap), with an address of its own."""
    return any(isinstance(n, TapNic | MacvtapNic) for n in spec.nics)


def port_map(spec: VMSpec) -> dict[str, int]:
    """Nomad port label → the guest port it reaches, from the tap NICs' published ports."""
    return {f.label: f.guest_port for n in spec.nics if isinstance(n, TapNic) for f in n.forwards}


def advertised(addresses: tuple[str, ...]) -> str:
    """The address Nomad advertises: the first IPv4 one, else the first."""
    v4 = [a for a in addresses if ipaddress.ip_address(a).version == 4]
    return (v4 or list(addresses))[0]


async def driver_network(sup: Supervisor, events: EventHub, task: Task,
                         wait_s: float) -> pb.NetworkOverride | None:
    """Wait (bounded) for the guest's address; the DriverNetwork, or None without one."""
    spec = spec_of(sup, task.id)
    if not has_own_address(spec):
        return None
    addresses = await sup.wait_addresses(task.id, wait_s)
    follow_changes(sup, events, task, addresses)
    if not addresses:
        events.emit(task, f"no guest address within {wait_s:g}s: started without one "
                          "(Nomad advertises no driver address for this task)")
        log.warning("task %s: no guest address within %gs", task.id, wait_s)
        return None
    return pb.NetworkOverride(port_map=port_map(spec), addr=advertised(addresses),
                              auto_advertise=True)


def follow_changes(sup: Supervisor, events: EventHub, task: Task,
                   known: tuple[str, ...] = ()) -> None:
    """A task event each time the guest's addresses change after the first are known
    (the first is the guest watch's "IP known" event)."""
    last = list(known)

    def changed(addresses: tuple[str, ...]) -> None:
        if last and list(addresses) != last:
            events.emit(task, f"guest address changed: {', '.join(addresses)} "
                              f"(was {', '.join(last)})", addresses=",".join(addresses))
        last[:] = addresses

    sup.on_addresses(task.id, changed)
