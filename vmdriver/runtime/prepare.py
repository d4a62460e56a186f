"""Everything decided before launch: binary, accelerator, images, sockets, helpers, policy.

Any failure here is an :class:`~vmdriver.errors.InputError` or
:class:`~vmdriver.errors.HostError` raised before QEMU starts, so a bad job
never leaves a half-started VM; image fds opened on the way are closed on
every failure path, and by :meth:`Prepared.close` when the VM is not launched.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from vmdriver.cloudinit.seed import fat_image, iso_image, write_atomically
from vmdriver.errors import AcceleratorUnavailable, HostError, SpecError
from vmdriver.host.config import HostConfig
from vmdriver.host.emulators import find_emulator
from vmdriver.host.features import option_takes_arg, supports_sandbox
from vmdriver.host.kvm import cached_probe
from vmdriver.policy import (
    OpenedImage,
    PathPolicy,
    check_args,
    check_emulator,
    inspect_image,
    resolve_allowed,
)
from vmdriver.policy.bounds import check_resources
from vmdriver.policy.images import checked_image
from vmdriver.qemu.argv import SANDBOX_ARG, DriveSource, NicFds, RbdSource, RenderContext
from vmdriver.qemu.blockdev import is_q35
from vmdriver.qemu.image import LAYERED_FORMATS, ImageInfo, backing_chain, image_info
from vmdriver.qemu.sidecars import HelperSpec, helpers_for
from vmdriver.runtime.process import close_fds
from vmdriver.runtime.taskdir import VMDirs, vm_key
from vmdriver.spec import (
    Accelerator,
    Bus,
    Drive,
    FileMedium,
    NoNic,
    RbdMedium,
    TapNic,
    UserNic,
    VMSpec,
)
from vmdriver.spec.devices import derive_mac
from vmdriver.storage.config import CephPoolConfig, parse_storage_pools
from vmdriver.storage.rbd import RbdPool


@dataclass(frozen=True)
class Prepared:
    """A spec made ready for this host: the render context minus the QMP fd."""

    spec: VMSpec
    ctx: RenderContext
    helpers: tuple[HelperSpec, ...] = ()
    #: Why the accelerator was chosen (for `run` output and the fingerprint).
    accel_reason: str = ""
    #: Files prepare created (overlays) that go when the VM's launch fails.
    created: tuple[Path, ...] = field(default=())

    def close(self) -> None:
        """Release the fds of a VM that will not be launched (launch closes them itself)."""
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


def with_own_macs(spec: VMSpec, vm_id: str) -> VMSpec:
    """The spec with each NIC's MAC fixed: as given, else derived from the VM id."""
    key = vm_key(vm_id)
    nics = tuple(nic if isinstance(nic, NoNic) or nic.mac else
                 nic.model_copy(update={"mac": derive_mac(key, nic.id)}) for nic in spec.nics)
    return spec.model_copy(update={"nics": nics})


class _Opener:
    """Opens and checks each drive's medium; owns the fds until handed over."""

    def __init__(self, dirs: VMDirs, host: HostConfig, policy: PathPolicy, prefix: str,
                 preview: bool) -> None:
        self.dirs, self.host, self.policy = dirs, host, policy
        self.prefix, self.preview = prefix, preview
        self.opened: list[OpenedImage] = []
        self.fds: list[int] = []
        self.created: list[Path] = []

    def close(self) -> None:
        for image in self.opened:
            image.close()
        close_fds(tuple(self.fds))
        for path in self.created:
            with contextlib.suppress(OSError):
                path.unlink()

    def source(self, index: int, drive: Drive) -> DriveSource | RbdSource | None:
        medium = drive.medium
        if medium is None:
            return None
        field_name = f"{self.prefix}{drive.origin or f'drive[{index}] ({drive.id})'}"
        if isinstance(medium, RbdMedium):
            return self._rbd(drive, medium, field_name)
        if self.preview:
            return self._preview(medium, field_name)
        if medium.overlay_on:
            self._make_overlay(medium, field_name)
        image, fmt = checked_image(medium.path, self.policy, fmt=medium.format,
                                   writable=drive.writable, where=field_name)
        self.opened.append(image)
        block = stat.S_ISBLK(os.fstat(image.ro_fd).st_mode)
        backing = self._backing(image.ro_fd, fmt, field_name, set_base=100 * (index + 1))
        return DriveSource(path=f"/dev/fdset/{index + 1}", format=fmt, fds=image.fds,
                           fdset=index + 1, block_device=block, backing=backing)

    def _backing(self, fd: int, fmt: str, where: str, *, set_base: int) -> tuple[DriveSource, ...]:
        """The image's backing chain, each file checked again and opened read-only as an fd."""
        if fmt not in LAYERED_FORMATS:
            return ()
        top = image_info(f"/dev/fd/{fd}", fmt=fmt, where=where, pass_fds=(fd,))
        if not top.backing_filename:
            return ()
        policy = self.policy.for_backing()

        def approve(image: ImageInfo, depth: int) -> str:
            name = image.backing or image.backing_filename or ""
            return str(resolve_allowed(name, policy, where=where, what="backing file"))

        out = []
        for i, layer in enumerate(backing_chain(top, approve, where=where)[1:]):
            layer_fd = os.open(layer.filename, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            self.fds.append(layer_fd)
            out.append(DriveSource(path=f"/dev/fdset/{set_base + i}", format=layer.format,
                                   fds=(layer_fd,), fdset=set_base + i))
        return tuple(out)

    def _rbd(self, drive: Drive, medium: RbdMedium, where: str) -> RbdSource:
        """An RBD image: its blockdev options, and its key in a 0600 file QEMU reads.

        The key comes from the operator's pool config (``secret_ref`` names the pool);
        it never enters the spec, the argv or the record.
        """
        pools = parse_storage_pools(self.host.storage_pools, "host config: storage_pools") \
            if self.host.storage_pools is not None else None
        config = next((p for p in pools.pools if p.name == medium.secret_ref), None) \
            if pools is not None else None
        if not isinstance(config, CephPoolConfig):
            raise HostError(f"{where}: no ceph storage pool named {medium.secret_ref!r} "
                            "in the host config")
        pool = RbdPool.from_config(config)
        secret = self.dirs.sockets / f"{drive.id}.key"
        if not self.preview:
            secret.unlink(missing_ok=True)  # a restart writes it afresh
            pool.write_secret_file(secret)
            self.created.append(secret)
        return RbdSource(options=pool.protocol(medium.image), secret_file=secret)

    def _preview(self, medium: FileMedium, where: str) -> DriveSource:
        if medium.overlay_on:  # the base an overlay will be made on obeys the policy too
            resolve_allowed(medium.overlay_on, self.policy.for_backing(), where=where,
                            what="overlay base")
        # This VM's policy (its volume dirs too); a path only, the file may not exist yet.
        shown = resolve_allowed(medium.path, self.policy, where=where, what="image path")
        if not shown.exists():
            # Artifacts may not be there yet: only where the path leads is checked.
            return DriveSource(path=str(shown), format=medium.format or "<detected>")
        image, fmt = checked_image(medium.path, self.policy, fmt=medium.format, writable=False,
                                   where=where)
        image.close()  # shown by path; nothing will be launched
        return DriveSource(path=str(image.path), format=fmt)

    def _make_overlay(self, medium: FileMedium, where: str) -> None:
        assert medium.overlay_on is not None
        base = resolve_allowed(medium.overlay_on, self.policy.for_backing(), where=where,
                               what="overlay base")
        fmt = inspect_image(str(base), self.policy.for_backing(), fmt=None, where=where,
                            value=str(base), base_dir=base.parent)
        target = self.dirs.task.path / medium.path if not Path(medium.path).is_absolute() \
            else Path(medium.path)
        if target.exists():
            return  # a restart keeps the overlay it wrote to
        out = subprocess.run(("qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(base),
                              "--", str(target)), capture_output=True, text=True, check=False,
                             stdin=subprocess.DEVNULL, timeout=60)
        if out.returncode != 0:
            raise SpecError(f"cannot create an overlay: {out.stderr.strip()[:200]}", where=where,
                            value=medium.path)
        self.created.append(target)


def _with_seed(spec: VMSpec, dirs: VMDirs, opener: _Opener) -> tuple[VMSpec, DriveSource | None]:
    """Build the spec's seed in the runtime dir and attach it as a read-only CD-ROM.

    The seed is vmdriver's own file, made from the spec: it is opened here, not
    through the job's path policy, and reaches QEMU as an fd like every image.
    """
    seed = spec.seed
    if seed is None:
        return spec, None
    path = dirs.runtime / f"{seed.label}.{'iso' if seed.format == 'iso' else 'img'}"
    drive = Drive(id="seed", medium=FileMedium(path=str(path), format="raw"), kind="cdrom",
                  bus=Bus.SATA if is_q35(spec) else Bus.IDE)
    spec = spec.model_copy(update={"drives": (*spec.drives, drive)})
    if opener.preview:
        return spec, DriveSource(path=str(path), format="raw")
    files = {name: text.encode() for name, text in seed.files}
    write_atomically(path, iso_image(files) if seed.format == "iso" else fat_image(files))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    opener.fds.append(fd)
    index = len(spec.drives)
    return spec, DriveSource(path=f"/dev/fdset/{index}", format="raw", fds=(fd,), fdset=index)


def _share_paths(spec: VMSpec, policy: PathPolicy, prefix: str,
                 preview: bool = False) -> dict[str, str]:
    out = {}
    for share in spec.shares:
        where = f"{prefix}share {share.tag}"
        path = resolve_allowed(share.path, policy, where=where, what="shared directory")
        # A preview may come before the task dirs exist: only where the path leads counts.
        if not path.is_dir() and not (preview and not path.exists()):
            raise SpecError("a shared directory must be a directory", where=where, value=share.path)
        out[share.tag] = str(path)
    return out


def _firmware_vars(spec: VMSpec) -> None:
    fw = spec.firmware
    if fw.kind == "bios" or not fw.vars or Path(fw.vars).exists():
        return
    if not fw.vars_template:
        raise SpecError("UEFI vars file is missing and there is no template to copy",
                        where="firmware", value=fw.vars)
    # Copied once, then kept: EFI variables persist across restarts.
    shutil.copyfile(fw.vars_template, fw.vars)
    Path(fw.vars).chmod(0o600)


def prepare(spec: VMSpec, dirs: VMDirs, host: HostConfig, *, vm_id: str, where: str = "",
            preview: bool = False, volume_dirs: tuple[Path, ...] = ()) -> Prepared:
    """Check ``spec`` against policy and this host; decide everything argv needs.

    With ``preview``, an image that is not there yet (it comes with the task's
    artifacts) is shown where QEMU will open it, its format as ``<detected>``,
    and nothing is opened or created. ``volume_dirs`` are this VM's own image dirs
    (a face's pool volumes); images under the operator's ``image_paths`` are
    shared, so they are opened read-only (a writer gets an overlay).
    """
    prefix = f"{where}: " if where else ""
    emulator = check_emulator(spec.emulator, host, where=f"{prefix}config.emulator")
    dirs.check_socket_paths()
    binary = find_emulator(emulator)
    task = dirs.task
    policy = PathPolicy.for_task(task.path, task.alloc_dir, host, volume_dirs=volume_dirs,
                                 shared_read_only=True)
    forwards = sum(len(n.forwards) for n in spec.nics if isinstance(n, UserNic | TapNic))
    check_resources(spec.resources.memory_mib, spec.resources.cores, forwards, host,
                    where=prefix)
    accel, reason = resolve_accelerator(spec.accelerator, binary, host.state_dir)
    _check_args(spec, dirs, host, policy, binary, prefix, preview)
    spec = with_own_macs(spec.model_copy(update={"emulator": emulator}), vm_id)
    opener = _Opener(dirs, host, policy, prefix, preview)
    try:
        drives = {d.id: src for i, d in enumerate(spec.drives)
                  if (src := opener.source(i, d)) is not None}
        spec, seed = _with_seed(spec, dirs, opener)
        if seed is not None:
            drives["seed"] = seed
        shares = _share_paths(spec, policy, prefix, preview)
        if not preview:
            _firmware_vars(spec)
    except BaseException:
        opener.close()
        raise
    ctx = RenderContext(
        binary=binary, accelerator=accel, runtime_dir=dirs.sockets, qmp_socket=dirs.qmp_socket,
        qga_socket=dirs.qga_socket, drives=drives, nic_fds=_preview_taps(spec) if preview else {},
        share_paths=shares, qmp_fd=None,
        sandbox=host.sandbox and supports_sandbox(binary, SANDBOX_ARG),
    )
    helpers = helpers_for(spec, dirs.sockets, dirs.data, shares)
    return Prepared(spec, ctx, helpers, reason, tuple(opener.created))


def _check_args(spec: VMSpec, dirs: VMDirs, host: HostConfig, policy: PathPolicy, binary: Path,
                prefix: str, preview: bool) -> None:
    def image_check(path: Path, fmt: str | None, here: str) -> None:
        # An image named in args is opened by QEMU by path: check what it references.
        if not preview:
            inspect_image(str(path), policy, fmt=fmt, where=here, value=str(path),
                          base_dir=path.parent)

    check_args(spec.args, host, where=f"{prefix}config.args", task_dir=dirs.task.path,
               alloc_dir=dirs.task.alloc_dir, arity=functools.partial(option_takes_arg, binary),
               image_check=image_check)


def _preview_taps(spec: VMSpec) -> dict[str, NicFds]:
    # Tap fds exist only at launch (the supervisor creates the taps): shown as -1.
    return {n.id: NicFds(-1) for n in spec.nics if not isinstance(n, UserNic | NoNic)}
