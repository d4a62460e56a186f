"""Everything decided before launch: binary, accelerator, images, sockets, policy.

Any failure here is an :class:`~vmdriver.errors.InputError` or
:class:`~vmdriver.errors.HostError` raised before QEMU starts, so a bad job
never leaves a half-started VM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmdriver.errors import AcceleratorUnavailable
from vmdriver.host.config import HostConfig
from vmdriver.host.emulators import find_emulator
from vmdriver.host.features import option_takes_arg, supports_sandbox
from vmdriver.host.kvm import cached_probe
from vmdriver.policy import (
    OpenedImage,
    PathPolicy,
    check_args,
    check_emulator,
    check_image_path,
    inspect_image,
)
from vmdriver.policy.args import static_arity
from vmdriver.policy.images import checked_image
from vmdriver.qemu.argv import SANDBOX_ARG, RenderContext
from vmdriver.runtime.process import close_fds
from vmdriver.runtime.taskdir import TaskDir
from vmdriver.spec import Accelerator, VMSpec


@dataclass(frozen=True)
class Prepared:
    """A spec made ready for this host: the render context minus the QMP fd."""

    spec: VMSpec
    ctx: RenderContext
    #: Why the accelerator was chosen (for `run` output and the fingerprint).
    accel_reason: str = ""

    def close(self) -> None:
        """Release the image fds of a VM that will not be launched (launch closes them)."""
        close_fds(self.ctx.pass_fds)


def resolve_accelerator(requested: Accelerator, qemu: Path, cache_dir: Path) -> tuple[str, str]:
    """``kvm`` or ``tcg`` for this host, and why."""
    if requested is Accelerator.TCG:
        return "tcg", "requested"
    verdict = cached_probe(qemu, cache_dir)
    if verdict.usable:
        return "kvm", verdict.reason
    if requested is Accelerator.KVM:
        raise AcceleratorUnavailable(f"accelerator \"kvm\" requested but KVM is not usable here: "
                                     f"{verdict.reason}")
    return "tcg", f"auto: KVM unusable ({verdict.reason})"


def prepare(spec: VMSpec, task_dir: TaskDir, host: HostConfig, *, where: str = "",
            preview: bool = False) -> Prepared:
    """Check ``spec`` against policy and this host; decide everything argv needs.

    With ``preview``, an image that is not there yet (it comes with the task's
    artifacts) is shown where QEMU will open it, its format as ``<detected>``.
    """
    prefix = f"{where}: " if where else ""
    emulator = check_emulator(spec.emulator, host, where=f"{prefix}config.emulator")
    task_dir.check_socket_paths()
    binary = find_emulator(emulator)
    policy = PathPolicy.for_task(task_dir.path, task_dir.alloc_dir, host)
    accel, reason = resolve_accelerator(spec.accelerator, binary, host.state_dir)

    def arity(name: str) -> bool | None:
        known = static_arity(name)
        return known if known is not None else option_takes_arg(binary, name)

    def image_check(path: Path, fmt: str | None, here: str) -> None:
        # An image named in args is opened by QEMU by path: check what it references.
        if not preview:
            inspect_image(str(path), policy, fmt=fmt, where=here, value=str(path),
                          base_dir=path.parent)

    check_args(spec.args, host, where=f"{prefix}config.args", task_dir=task_dir.path,
               alloc_dir=task_dir.alloc_dir, arity=arity, image_check=image_check)
    paths: list[str] = []
    formats: list[str] = []
    opened: list[OpenedImage] = []
    try:
        for i, drive in enumerate(spec.drives):
            field = f"{prefix}config.image_path" if i == 0 else f"{prefix}drive[{i}]"
            if preview:
                shown = check_image_path(drive.path, task_dir.path, task_dir.alloc_dir, host,
                                         where=field, must_exist=False)
                if not shown.exists():
                    # Artifacts may not be there yet: only where the path leads is checked.
                    paths.append(str(shown))
                    formats.append(drive.format or "<detected>")
                    continue
            writable = not drive.read_only and drive.media != "cdrom"
            image, fmt = checked_image(drive.path, policy, fmt=drive.format, writable=writable,
                                       where=field)
            paths.append(str(image.path))
            formats.append(fmt)
            if preview:
                image.close()  # shown by path; nothing will be launched
            else:
                opened.append(image)
    except BaseException:
        for image in opened:
            image.close()
        raise
    ctx = RenderContext(
        binary=binary, accelerator=accel, qmp_socket=task_dir.qmp_socket,
        qga_socket=task_dir.qga_socket, drive_paths=tuple(paths),
        drive_formats=tuple(formats), qmp_fd=None,
        sandbox=host.sandbox and supports_sandbox(binary, SANDBOX_ARG),
        drive_fds=tuple(image.fds for image in opened),
    )
    return Prepared(spec.model_copy(update={"emulator": emulator}), ctx, reason)
