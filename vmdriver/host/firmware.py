"""UEFI firmware (OVMF) on this host: which files, and a VM's own copy of the variables.

Firmware kinds are VM-Operator's: ``bios`` (QEMU's built-in SeaBIOS, no files),
``uefi``, ``uefi-4m``, ``secure`` and ``secure-4m``. Each kind lists candidate
*pairs* of a code file and a variables template (Debian, then Fedora, then Arch
paths); the first pair whose two files exist wins. Pairs, not two separate lists as
in VM-Operator, so a 2 MiB code file is never matched with 4 MiB variables (and the
``secure-4m`` vars candidate is a vars file, not VM-Operator's CODE typo).

This module states host facts only; rendering ``-blockdev``/``pflash`` is the qemu
layer's job.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmdriver.errors import HostError

log = logging.getLogger(__name__)

FirmwareKind = Literal["bios", "uefi", "uefi-4m", "secure", "secure-4m"]
KINDS: tuple[str, ...] = ("bios", "uefi", "uefi-4m", "secure", "secure-4m")
#: QEMU's firmware descriptors (docs/interop/firmware.json), system then admin dirs.
DESCRIPTOR_DIRS = (Path("/usr/share/qemu/firmware"), Path("/etc/qemu/firmware"))
VARS_NAME = "fw-vars.fd"

_D, _F, _A = "/usr/share/OVMF", "/usr/share/edk2/ovmf", "/usr/share/edk2/x64"
_F4 = "/usr/share/edk2/ovmf-4m"
_UEFI_4M = (
    (f"{_D}/OVMF_CODE_4M.fd", f"{_D}/OVMF_VARS_4M.fd"),
    (f"{_F4}/OVMF_CODE.fd", f"{_F4}/OVMF_VARS.fd"),
    (f"{_A}/OVMF_CODE.4m.fd", f"{_A}/OVMF_VARS.4m.fd"),
)
#: Secure boot with Microsoft's keys enrolled (what "secure" means to a Windows guest).
_SECURE_4M = (
    (f"{_D}/OVMF_CODE_4M.secboot.fd", f"{_D}/OVMF_VARS_4M.ms.fd"),
    (f"{_F4}/OVMF_CODE.secboot.fd", f"{_F4}/OVMF_VARS.secboot.fd"),
    (f"{_A}/OVMF_CODE.secboot.4m.fd", f"{_A}/OVMF_VARS.4m.fd"),
)
CANDIDATES: dict[str, tuple[tuple[str, str], ...]] = {
    "bios": (),
    # 2 MiB builds first, as in VM-Operator; the 4 MiB ones where a distro dropped them.
    "uefi": (
        (f"{_D}/OVMF_CODE.fd", f"{_D}/OVMF_VARS.fd"),
        (f"{_F}/OVMF_CODE.fd", f"{_F}/OVMF_VARS.fd"),
        (f"{_A}/OVMF_CODE.fd", f"{_A}/OVMF_VARS.fd"),
        *_UEFI_4M,
    ),
    "uefi-4m": _UEFI_4M,
    "secure": (
        (f"{_D}/OVMF_CODE.secboot.fd", f"{_D}/OVMF_VARS.ms.fd"),
        (f"{_F}/OVMF_CODE.secboot.fd", f"{_F}/OVMF_VARS.secboot.fd"),
        (f"{_A}/OVMF_CODE.secboot.fd", f"{_A}/OVMF_VARS.fd"),
        *_SECURE_4M,
    ),
    "secure-4m": _SECURE_4M,
}


@dataclass(frozen=True)
class Firmware:
    """The UEFI files of one kind, as found on this host."""

    kind: str
    #: The read-only code (pflash0).
    code: Path
    #: The pristine variables store each VM copies once (pflash1 is the copy).
    vars_template: Path
    #: Secure boot needs SMM (``-machine smm=on``) and a secure pflash
    #: (``-global driver=cfi.pflash01,property=secure,value=on``).
    requires_smm: bool
    secure_boot: bool


def _descriptor_features(code: Path, dirs: tuple[Path, ...]) -> set[str]:
    """The ``features`` QEMU's firmware descriptors list for this code file."""
    target = os.path.realpath(code)
    features: set[str] = set()
    for directory in dirs:
        for file in sorted(directory.glob("*.json")) if directory.is_dir() else ():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
                name = data["mapping"]["executable"]["filename"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not ours to judge; QEMU ignores broken descriptors too
            if isinstance(name, str) and os.path.realpath(name) == target:
                features.update(f for f in data.get("features", ()) if isinstance(f, str))
    return features


def find_firmware(kind: str, *, root: Path = Path("/"),
                  descriptor_dirs: tuple[Path, ...] = DESCRIPTOR_DIRS) -> Firmware | None:
    """The firmware files of ``kind``; ``None`` for ``bios``. ``root`` is for tests."""
    if kind not in CANDIDATES:
        raise HostError(f"unknown firmware {kind!r} (allowed: {', '.join(KINDS)})")
    pairs = CANDIDATES[kind]
    if not pairs:
        return None
    for code, template in pairs:
        code_path, vars_path = root / code.lstrip("/"), root / template.lstrip("/")
        if code_path.is_file() and vars_path.is_file():
            features = _descriptor_features(code_path, descriptor_dirs)
            secure = kind.startswith("secure")
            return Firmware(kind=kind, code=code_path, vars_template=vars_path,
                            requires_smm=secure or "requires-smm" in features,
                            secure_boot=secure or "secure-boot" in features)
    listed = "; ".join(f"{c} + {v}" for c, v in pairs)
    raise HostError(f"firmware {kind!r}: no OVMF code and vars files found (install Debian's "
                    f"ovmf package); candidates were: {listed}")


def vars_file(data_dir: Path, firmware: Firmware) -> Path:
    """The VM's own EFI variables store in ``data_dir``, copied from the template once.

    Later starts reuse the copy, so boot entries and enrolled keys persist. A copy
    whose size does not fit the firmware (the kind changed between 2 MiB and 4 MiB
    builds) cannot boot: it is kept as ``fw-vars.fd.old`` and replaced, with a warning.
    """
    target = data_dir / VARS_NAME
    if target.exists():
        want = firmware.vars_template.stat().st_size
        have = target.stat().st_size
        if have == want:
            return target
        log.warning("%s has %d bytes but %s needs %d: keeping it as %s.old and starting "
                    "from a fresh copy (EFI variables are reset)", target, have,
                    firmware.code.name, want, VARS_NAME)
        target.replace(target.with_name(VARS_NAME + ".old"))
    tmp = target.with_name(VARS_NAME + ".tmp")
    try:
        shutil.copyfile(firmware.vars_template, tmp)
        tmp.chmod(0o600)
        tmp.replace(target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HostError(f"cannot copy {firmware.vars_template} to {target}: {exc.strerror}"
                        ) from None
    return target
