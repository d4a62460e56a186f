"""What this host offers: emulators, their versions, and KVM usability.

The attribute names are the ones Nomad's qemu driver publishes, so job
constraints written for it keep working. ``facts`` are vmdriver's own findings
(KVM, confinement) without a prefix, for a face that publishes them under
another driver's name (the Nomad plugin installed as ``virt``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vmdriver.host.emulators import Emulator, emulator_version, find_emulators, normalize_emulator
from vmdriver.host.kvm import KvmVerdict, cached_probe
from vmdriver.jail.probe import probe


@dataclass(frozen=True)
class Fingerprint:
    """A snapshot of the host's QEMU capabilities."""

    emulators: tuple[Emulator, ...]
    kvm: KvmVerdict
    attributes: dict[str, str | bool] = field(default_factory=dict)
    #: vmdriver's own findings, unprefixed: ``kvm`` and the ``jail.*`` keys.
    facts: dict[str, str | bool] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        """Nomad's "healthy": at least one emulator with a readable version."""
        return bool(self.emulators) and self.emulators[0].version is not None

    @property
    def description(self) -> str:
        """Nomad's health description."""
        if not self.emulators:
            return "no qemu-system-* emulator found on PATH"
        if self.emulators[0].version is None:
            return f"failed to read the version of {self.emulators[0].path}"
        return "Healthy"


def fingerprint(
    cache_dir: Path, allowlist: tuple[str, ...] = (), path: str | None = None
) -> Fingerprint:
    """Find emulators (limited to ``allowlist`` if given), read versions, probe KVM."""
    allowed = {normalize_emulator(a) for a in allowlist}
    found = {a: p for a, p in find_emulators(path).items() if not allowed or a in allowed}
    archs = sorted(found)
    with ThreadPoolExecutor(max_workers=4) as pool:
        versions = list(pool.map(lambda a: emulator_version(found[a]), archs))
        # The probe needs an x86 binary matching the host; the others are independent.
        host_arch = "x86_64" if "x86_64" in found else None
        kvm_future = (
            pool.submit(cached_probe, found[host_arch].resolve(), cache_dir)
            if host_arch
            else None
        )
        kvm = (
            kvm_future.result()
            if kvm_future
            else KvmVerdict(False, "no qemu-system-x86_64 to probe KVM with")
        )
    emulators = tuple(Emulator(a, found[a], v) for a, v in zip(archs, versions, strict=True))
    attributes: dict[str, str | bool] = {}
    facts: dict[str, str | bool] = {}
    if emulators and emulators[0].version:
        # What this host can confine QEMU with (jail, cgroups, seccomp), never silently.
        facts = {"kvm": kvm.usable, **probe(str(found[archs[0]])).as_dict()}
        attributes = {
            "driver.qemu": True,
            "driver.qemu.version": emulators[0].version,
            "driver.qemu.emulators": ",".join(archs),
            **{f"driver.qemu.{k}": v for k, v in facts.items()},
        }
    return Fingerprint(emulators, kvm, attributes, facts)
