"""Policy checks applied to a spec before anything is launched.

Stricter than Nomad's string comparisons: paths are decided after resolving
``..`` and symlinks (:mod:`vmdriver.policy.paths`), flags however they are
spelled and values by what QEMU does with them (:mod:`vmdriver.policy.args`),
images by what they reference (:mod:`vmdriver.policy.images`).
"""

from __future__ import annotations

from vmdriver.errors import PolicyError, SpecError
from vmdriver.host.config import HostConfig
from vmdriver.host.emulators import normalize_emulator, valid_emulator_name
from vmdriver.policy.args import check_args
from vmdriver.policy.paths import check_image_path

#: The emulator a job gets when it names none (Nomad's default).
DEFAULT_EMULATOR = "x86_64"

__all__ = ["DEFAULT_EMULATOR", "check_args", "check_emulator", "check_image_path"]


def check_emulator(emulator: str | None, host: HostConfig, *, where: str = "emulator") -> str:
    """Normalize ``emulator`` and check it against ``emulators_allowlist``.

    ``x86_64`` and ``qemu-system-x86_64`` name the same emulator, in the job and
    in the allowlist alike; an unset or empty emulator is the default, and the
    default is checked like any other. A name is never a path.
    """
    if emulator is not None and not isinstance(emulator, str):
        raise SpecError("emulator must be a name", where=where, value=emulator,
                        allowed="e.g. x86_64, aarch64")
    name = normalize_emulator(emulator or DEFAULT_EMULATOR)
    if not valid_emulator_name(name):
        raise SpecError("emulator must be an architecture name, not a path", where=where,
                        value=emulator, allowed="e.g. x86_64, aarch64")
    allowed = {normalize_emulator(a) for a in host.emulators_allowlist}
    if allowed and name not in allowed:
        raise PolicyError("emulator is not in emulators_allowlist", where=where,
                          value=emulator or f"{name} (the default)", allowed=sorted(allowed))
    return name
