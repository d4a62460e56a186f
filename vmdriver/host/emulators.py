"""Finding QEMU system emulators and their versions.

Unlike Nomad's qemu driver, which stops at the first PATH directory holding any
``qemu-system-*``, every PATH directory is searched; the first binary of each
name wins, as a shell would pick it.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vmdriver.errors import EmulatorNotFound

PREFIX = "qemu-system-"
_VERSION_RE = re.compile(r"version (\d[\.\d]+)")
#: Emulator names are architecture names: never a path, never options.
_NAME_RE = re.compile(r"^[a-z0-9_]{1,32}$")


@dataclass(frozen=True)
class Emulator:
    """One ``qemu-system-<arch>`` binary."""

    arch: str
    path: Path
    version: str | None = None


def normalize_emulator(name: str) -> str:
    """``qemu-system-x86_64`` and ``x86_64`` both name the ``x86_64`` emulator."""
    name = name.strip()
    return name[len(PREFIX) :] if name.startswith(PREFIX) else name


def valid_emulator_name(name: str) -> bool:
    """True if ``name`` (already normalized) can only ever name a binary in PATH."""
    return bool(_NAME_RE.match(name))


def _path_dirs(path: str | None) -> list[Path]:
    raw = os.environ.get("PATH", os.defpath) if path is None else path
    return [Path(p) for p in raw.split(os.pathsep) if p]


def find_emulators(path: str | None = None) -> dict[str, Path]:
    """Map arch → binary for every ``qemu-system-*`` executable on ``PATH``."""
    found: dict[str, Path] = {}
    for directory in _path_dirs(path):
        try:
            entries = sorted(directory.glob(PREFIX + "*"))
        except OSError:
            continue
        for entry in entries:
            arch = entry.name[len(PREFIX) :]
            if arch in found or not valid_emulator_name(arch):
                continue
            if entry.is_file() and os.access(entry, os.X_OK):
                found[arch] = entry
    return found


def find_emulator(arch: str, path: str | None = None) -> Path:
    """The binary for ``arch``, with symlinks resolved; raise if there is none."""
    arch = normalize_emulator(arch)
    # Look up the one name per PATH dir instead of listing every dir: listing
    # /usr/bin cost ~3-7 ms on each VM start (bench/). Same pick as find_emulators.
    binary = None
    if valid_emulator_name(arch):
        for directory in _path_dirs(path):
            entry = directory / (PREFIX + arch)
            if entry.is_file() and os.access(entry, os.X_OK):
                binary = entry
                break
    if binary is None:
        raise EmulatorNotFound(
            f"emulator {arch!r}: no {PREFIX}{arch} executable on PATH "
            f"(install QEMU, e.g. apt-get install qemu-system-x86)"
        )
    return binary.resolve()


def emulator_version(binary: Path, timeout: float = 5.0) -> str | None:
    """The version ``binary --version`` reports, or ``None`` if it cannot tell."""
    try:
        out = subprocess.run(
            (str(binary), "--version"),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = _VERSION_RE.search(out)
    return m.group(1) if m else None
