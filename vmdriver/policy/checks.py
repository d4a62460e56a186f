"""Policy checks applied to a spec before anything is launched.

Stricter than Nomad's string comparisons: paths are decided after resolving
``..`` and symlinks, flags however they are spelled.
"""

from __future__ import annotations

from pathlib import Path

from vmdriver.errors import PolicyError, SpecError
from vmdriver.host.config import HostConfig
from vmdriver.host.emulators import normalize_emulator, valid_emulator_name


def _is_under(path: Path, base: Path) -> bool:
    return path == base or base in path.parents


def check_image_path(image: str, task_dir: Path, alloc_dir: Path, host: HostConfig,
                     *, where: str = "image_path") -> Path:  # fmt: skip
    """Resolve ``image`` and return it if policy allows it; relative paths live in the task dir."""
    raw = Path(image)
    candidate = raw if raw.is_absolute() else task_dir / raw
    try:
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise SpecError("image file does not exist", where=where, value=image) from None
    except (OSError, RuntimeError) as exc:
        raise SpecError(f"image path cannot be resolved: {exc}", where=where, value=image) from None
    bases = [alloc_dir.resolve(), task_dir.resolve()]
    bases += [Path(p).resolve() for p in host.image_paths if Path(p).is_absolute()]
    if not raw.is_absolute() and not _is_under(resolved, task_dir.resolve()):
        raise PolicyError("relative image path leaves the task dir", where=where, value=image)
    if not any(_is_under(resolved, b) for b in bases):
        raise PolicyError(
            "image path is not in the allowed paths", where=where, value=image,
            allowed=", ".join(["the task dir", *host.image_paths]),
        )  # fmt: skip
    if not resolved.is_file():
        raise SpecError("image path is not a regular file", where=where, value=image)
    return resolved


def check_emulator(emulator: str, host: HostConfig, *, where: str = "emulator") -> str:
    """Normalize ``emulator`` and check it against ``emulators_allowlist``."""
    name = normalize_emulator(emulator or "x86_64")
    if not valid_emulator_name(name):
        raise SpecError("emulator must be an architecture name, not a path", where=where,
                        value=emulator, allowed="e.g. x86_64, aarch64")  # fmt: skip
    allowed = {normalize_emulator(a) for a in host.emulators_allowlist}
    if allowed and name not in allowed:
        raise PolicyError("emulator is not allowed", where=where, value=emulator,
                          allowed=sorted(allowed))  # fmt: skip
    return name


def check_args(args: tuple[str, ...], host: HostConfig, *, where: str = "args") -> None:
    """Every flag in ``args`` must be in ``args_allowlist`` (if the operator set one)."""
    if not host.args_allowlist:
        return
    allowed = {a.strip().lstrip("-") for a in host.args_allowlist}
    for i, arg in enumerate(args):
        text = arg.strip()
        if text.startswith("-"):
            flag = text.lstrip("-").split("=", 1)[0]
            if flag not in allowed:
                raise PolicyError("flag is not in args_allowlist", where=f"{where}[{i}]",
                                  value=arg, allowed=sorted(host.args_allowlist))  # fmt: skip
