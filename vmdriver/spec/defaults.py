"""Every default a VM gets when nobody said otherwise, in one place.

Faces (job files, the Nomad plugin, the runner), the spec models and the
runtime read these names; none repeats the numbers.
"""

from __future__ import annotations

#: Guest RAM when a task sets no ``resources.memory`` (Nomad's default, MB).
MEMORY_MIB = 300
#: Nomad's default ``resources.cpu`` (MHz): only weights the cgroup.
CPU_MHZ = 100
#: Signal sent to QEMU when a stop is not graceful, or the guest ignored the button.
KILL_SIGNAL = "SIGINT"
#: Seconds the guest (graceful) or QEMU (after the signal) gets before the next rung.
KILL_TIMEOUT_S = 5.0
#: Seconds QEMU's POWERDOWN event may take to confirm the ACPI power button press.
POWERDOWN_CONFIRM_S = 2.0
#: Architecture suffix of ``qemu-system-<emulator>``.
EMULATOR = "x86_64"
#: Machine type of the qemu dialect (Nomad's).
MACHINE = "pc"
#: NIC model of a NIC that names none.
NIC_MODEL = "virtio-net-pci"
#: The MAC prefix QEMU uses; the first octet has the locally-administered bit set.
MAC_PREFIX = "52:54:00"
