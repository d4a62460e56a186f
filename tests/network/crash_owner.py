"""Stand-in for a vmdriver that gets killed -9: sets a VM's network up, then waits to die.

Run inside the test's namespace: ``python -m tests.network.crash_owner STATE_DIR DEVICE``.
It starts the "crashnet" network with its dnsmasq, attaches VM ``crashed/vm`` with
a tap (held by a ``sleep`` standing in for a QEMU that outlives vmdriver) and a
macvtap on DEVICE, publishes a port, prints one JSON line, and sleeps.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from pathlib import Path

from vmdriver.network import HostNetwork, NetworkSettings, NicRequest, PortMap
from vmdriver.network.dnsmasq import Dnsmasq

CRASH_VM = "crashed/vm"
CRASH_NET = {"bridge": "vmdbr1", "subnet": "10.216.0.0/24"}


def crash_settings(device: str) -> NetworkSettings:
    return NetworkSettings.model_validate({"networks": {"crashnet": CRASH_NET},
                                           "allowed_devices": [device]})


def main() -> None:
    state, device = Path(sys.argv[1]), sys.argv[2]
    hn = HostNetwork(crash_settings(device), state)
    net = hn.settings.networks["crashnet"]
    hn.ensure_network(net)
    dns_pid = Dnsmasq(net, state).start()
    vmnet = hn.attach(CRASH_VM, [NicRequest(0, "tap", bridge="vmdbr1"),
                                 NicRequest(1, "macvtap", device=device)])
    holder = subprocess.Popen(["sleep", "600"], pass_fds=vmnet.pass_fds())
    vmnet.close_fds()
    hn.publish(CRASH_VM, [PortMap(21000, 80)], [ipaddress.ip_address("10.216.0.9")])
    print(json.dumps({"dnsmasq": dns_pid, "holder": holder.pid,
                      "links": [n.tap.name for n in vmnet.nics]}), flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
