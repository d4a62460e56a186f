"""Everything decided before launch: binary, accelerator, images, sockets, policy.

Any failure here is an :class:`~vmdriver.errors.InputError` or
:class:`~vmdriver.errors.HostError` raised before QEMU starts, so a bad job
never leaves a half-started VM.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vmdriver.errors import AcceleratorUnavailable, SpecError
from vmdriver.host.config import HostConfig
from vmdriver.host.emulators import find_emulator
from vmdriver.host.kvm import cached_probe
from vmdriver.policy import check_args, check_emulator, check_image_path
from vmdriver.qemu.argv import RenderContext
from vmdriver.runtime.taskdir import TaskDir
from vmdriver.spec import Accelerator, VMSpec, resolve_in

#: Formats QEMU may be told an image has; anything else is refused.
KNOWN_FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vhdx", "vpc", "qed", "qcow", "dmg", "parallels")


@dataclass(frozen=True)
class Prepared:
    """A spec made ready for this host: the render context minus the QMP fd."""

    spec: VMSpec
    ctx: RenderContext
    #: Why the accelerator was chosen (for `run` output and the fingerprint).
    accel_reason: str = ""


def detect_format(path: Path, *, where: str) -> str:
    """The image's format as ``qemu-img info`` reads it."""
    try:
        out = subprocess.run(
            ("qemu-img", "info", "--output=json", "--", str(path)),
            capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except FileNotFoundError:
        raise SpecError("qemu-img is not installed; it is needed to detect image formats",
                        where=where) from None  # fmt: skip
    except subprocess.TimeoutExpired:
        raise SpecError("qemu-img info timed out", where=where, value=str(path)) from None
    if out.returncode != 0:
        msg = (out.stderr.strip().splitlines() or ["unreadable image"])[-1]
        raise SpecError(f"not a usable disk image: {msg}", where=where, value=str(path))
    fmt = str(json.loads(out.stdout).get("format", ""))
    if fmt not in KNOWN_FORMATS:
        raise SpecError("unsupported image format", where=where, value=fmt, allowed=KNOWN_FORMATS)
    return fmt


def resolve_accelerator(requested: Accelerator, qemu: Path, cache_dir: Path) -> tuple[str, str]:
    """``kvm`` or ``tcg`` for this host, and why."""
    if requested is Accelerator.TCG:
        return "tcg", "requested"
    verdict = cached_probe(qemu, cache_dir)
    if verdict.usable:
        return "kvm", verdict.reason
    if requested is Accelerator.KVM:
        raise AcceleratorUnavailable(f"accelerator \"kvm\" requested but KVM is not usable here: "
                                     f"{verdict.reason}")  # fmt: skip
    return "tcg", f"auto: KVM unusable ({verdict.reason})"


def prepare(spec: VMSpec, task_dir: TaskDir, host: HostConfig, *, where: str = "",
            preview: bool = False) -> Prepared:  # fmt: skip
    """Check ``spec`` against policy and this host; decide everything argv needs.

    With ``preview``, an image that is not there yet (it comes with the task's
    artifacts) is shown where QEMU will open it, its format as ``<detected>``.
    """
    prefix = f"{where}: " if where else ""
    emulator = check_emulator(spec.emulator, host, where=f"{prefix}config.emulator")
    check_args(spec.args, host, where=f"{prefix}config.args")
    task_dir.check_socket_paths()
    binary = find_emulator(emulator)
    paths: list[str] = []
    formats: list[str] = []
    for i, drive in enumerate(spec.drives):
        field = f"{prefix}config.image_path" if i == 0 else f"{prefix}drive[{i}]"
        if preview and not resolve_in(task_dir.path, drive.path).exists():
            paths.append(str(resolve_in(task_dir.path, drive.path)))
            formats.append(drive.format or "<detected>")
            continue
        resolved = check_image_path(drive.path, task_dir.path, task_dir.alloc_dir, host,
                                    where=field)  # fmt: skip
        if drive.format is not None and drive.format not in KNOWN_FORMATS:
            raise SpecError("unsupported image format", where=field, value=drive.format,
                            allowed=KNOWN_FORMATS)  # fmt: skip
        paths.append(str(resolved))
        formats.append(drive.format or detect_format(resolved, where=field))
    accel, reason = resolve_accelerator(spec.accelerator, binary, host.state_dir)
    ctx = RenderContext(
        binary=binary, accelerator=accel, qmp_socket=task_dir.qmp_socket,
        qga_socket=task_dir.qga_socket, drive_paths=tuple(paths),
        drive_formats=tuple(formats), qmp_fd=None, sandbox=host.sandbox,
    )  # fmt: skip
    return Prepared(spec.model_copy(update={"emulator": emulator}), ctx, reason)
