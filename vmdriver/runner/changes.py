"""What a changed config file asks of a running VM.

VM-Operator applies ``currentRam`` (balloon), ``currentCpus`` (CPU hotplug), a CD-ROM's
``file`` (tray), ``powerdownTimeout``, an increased ``resetCounter`` (``system_reset``),
``display.loggedInUser`` and ``guestShutdownStops`` while the VM runs; everything else
takes effect at the next start and was silently ignored until then. :func:`diff` sorts a
change into the two, so the runner can apply the first kind and *report* the second.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from vmdriver.runner.config import RunnerConfig

#: The standard template's RAM when ``maximumRam`` is unset.
DEFAULT_RAM = 1 << 30
#: Keys (``/Runner``-relative, VM-Operator's names) applied without a restart.
LIVE_KEYS = frozenset({
    "vm.currentRam", "vm.currentCpus", "vm.powerdownTimeout", "resetCounter",
    "vm.display.loggedInUser", "guestShutdownStops",
})


@dataclass(frozen=True)
class Changes:
    """The difference between two configs of one VM, as the runner acts on it."""

    #: New balloon target in bytes.
    ram: int | None = None
    #: New vCPU count (hotplug), already capped at the running VM's maximum.
    cpus: int | None = None
    #: CD-ROM id (``cd0``...) → the new image, or ``None`` to eject.
    media: Mapping[str, str | None] = field(default_factory=dict)
    powerdown_timeout: int | None = None
    #: ``resetCounter`` increased: send ``system_reset``.
    reset: bool = False
    guest_shutdown_stops: bool | None = None
    #: The auto-login user changed (``None`` in the new config: log out).
    logged_in_user_changed: bool = False
    logged_in_user: str | None = None
    #: Keys that changed but only take effect when the VM starts again.
    restart_needed: tuple[str, ...] = ()

    @property
    def live(self) -> bool:
        """True if anything is to be applied to the running VM."""
        return bool(self.ram is not None or self.cpus is not None or self.media or self.reset
                    or self.powerdown_timeout is not None or self.guest_shutdown_stops is not None
                    or self.logged_in_user_changed)


def _leaves(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(data, Mapping):
        for key, value in data.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, list):
        yield (f"{prefix}.length", len(data))
        for i, value in enumerate(data):
            yield from _leaves(value, f"{prefix}[{i}]")
    else:
        yield (prefix, data)


def changed_keys(old: RunnerConfig, new: RunnerConfig) -> list[str]:
    """Every key path whose value differs (``vm.drives[1].file``), in file order."""
    a = dict(_leaves(old.model_dump(by_alias=True, mode="json")))
    b = dict(_leaves(new.model_dump(by_alias=True, mode="json")))
    return [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]


def _cd_paths(config: RunnerConfig) -> list[str | None]:
    return [d.file or d.resource or None for d in config.vm.drives if d.type == "ide-cd"]


def _is_cd_medium(config: RunnerConfig, key: str) -> bool:
    """``vm.drives[i].file`` (or ``resource``) of a CD-ROM present in both configs."""
    if not key.startswith("vm.drives[") or not key.endswith(("].file", "].resource")):
        return False
    index = int(key[len("vm.drives["):key.index("]")])
    drives = config.vm.drives
    return index < len(drives) and drives[index].type == "ide-cd"


def diff(old: RunnerConfig, new: RunnerConfig) -> Changes:
    """Sort what changed from ``old`` (the running VM's) to ``new`` into live and restart."""
    keys = changed_keys(old, new)
    restart = [k for k in keys if k not in LIVE_KEYS and not _is_cd_medium(old, k)]
    o, n = old.vm, new.vm
    ram = None
    if "vm.currentRam" in keys or "vm.maximumRam" in keys:
        top = o.maximum_ram or DEFAULT_RAM  # the running VM's ceiling
        target = min(n.current_ram or n.maximum_ram or DEFAULT_RAM, top)
        ram = target if target != (o.current_ram or top) else None
    cpus = min(n.current_cpus, o.maximum_cpus) if n.current_cpus != o.current_cpus else None
    media: dict[str, str | None] = {}
    old_cds, new_cds = _cd_paths(old), _cd_paths(new)
    if len(old_cds) == len(new_cds):
        media = {f"cd{i}": b for i, (a, b) in enumerate(zip(old_cds, new_cds, strict=True)) if a != b}
    return Changes(
        ram=ram,
        cpus=cpus,
        media=media,
        powerdown_timeout=n.powerdown_timeout if n.powerdown_timeout != o.powerdown_timeout else None,
        # As in VM-Operator: only an increase resets, and only of a counter that was set.
        reset=(old.reset_counter is not None and new.reset_counter is not None
               and new.reset_counter > old.reset_counter),
        guest_shutdown_stops=(new.guest_shutdown_stops
                              if new.guest_shutdown_stops != old.guest_shutdown_stops else None),
        logged_in_user_changed=n.display.logged_in_user != o.display.logged_in_user,
        logged_in_user=n.display.logged_in_user,
        restart_needed=tuple(restart),
    )
