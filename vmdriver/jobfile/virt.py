"""The ``driver = "virt"`` dialect: nomad-driver-virt's jobs as vmdriver VMs.

Two steps, because a virt task's disks are pool volumes made from the task's
artifacts:

- :func:`build_spec` (pure, at planning): machine, resources, NICs, the guest
  agent and a graceful stop; every field is checked here, so a bad job is one
  line and exit 2 before anything exists.
- :func:`provision` (once the task dir and artifacts are there): the task's
  volumes in their pools (``exist_ok``: a re-started task gets its own back),
  each source image opened through the same image policy as ``image_path``; the
  cloud-init seed; the task dirs as read-only shares. Everything that can fail
  on input is checked before the first volume is made, and a failure after it
  removes the task's volumes again.

:func:`release` removes a task's volumes (DestroyTask, the end of `vmdriver run`).
The VM's drives are pool files: :class:`~vmdriver.jobfile.placement.Provisioned`
names exactly the task's volumes and their bases, so the runtime's path policy
(and a jail's read-only binds) admit those for this VM only, never the rest of
the pool (other tasks' volumes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vmdriver.cloudinit import (
    SeedRequest,
    ShareFs,
    default_hostname,
    default_instance_id,
    guest_env,
    hash_password,
    seed_files,
    split_keys,
    task_shares,
)
from vmdriver.cloudinit import Share as GuestShare
from vmdriver.errors import HostError, SpecError
from vmdriver.host.config import HostConfig
from vmdriver.jobfile.hostcheck import check_host
from vmdriver.jobfile.inputs import TaskInputs, check_dns, stop_policy, task_resources
from vmdriver.jobfile.placement import Placement, Provisioned
from vmdriver.jobfile.virt_config import VirtConfig
from vmdriver.policy.images import checked_image
from vmdriver.policy.paths import OpenedImage, PathPolicy, resolve_allowed
from vmdriver.qemu.sidecars import VIRTIOFSD
from vmdriver.runtime.taskdir import TaskDir
from vmdriver.spec import (
    Accelerator,
    FileMedium,
    MacvtapNic,
    Nic,
    PortForward,
    Seed,
    Share,
    TapNic,
    UserNic,
    VMSpec,
)
from vmdriver.storage import DirectoryPoolConfig, DiskRequest, Pools, SourceImage, Volume
from vmdriver.storage.attach import drive_for
from vmdriver.storage.base import volume_name
from vmdriver.storage.directory import META
from vmdriver.storage.disks import DiskFormat
from vmdriver.storage.pools import backend

#: A user_data file larger than this is refused (the seed holds at most 16 MiB).
MAX_USER_DATA = 1024 * 1024
#: SeedRequest's field names → the virt config's.
_SEED_FIELDS = {"ssh_authorized_keys": "default_user_authorized_ssh_key",
                "password_hash": "default_user_password"}
LIBVIRT_UNAVAILABLE = ("the libvirt provider is not available in this backend; vmdriver runs "
                       "QEMU itself (remove the provider block)")


def build_spec(cfg: VirtConfig, inputs: TaskInputs) -> VMSpec:
    """The VM of a virt task before its volumes exist; raises SpecError naming the field."""
    base = f"{inputs.where}.config"
    check_dns(inputs)
    for i, disk in enumerate(cfg.disks):
        if disk.volume is not None:
            raise SpecError("Nomad block-device volumes are not supported by this driver yet",
                            where=f"{base}.disk[{i}].volume", value=disk.volume,
                            allowed="a pool volume (source, size)")
    _seed_request(cfg, inputs, "0" * 8, password_hash=None, user_data=None)
    return VMSpec(
        name=inputs.name,
        display_name=inputs.name,
        emulator=cfg.emulator,
        machine_type=cfg.task.os.machine,
        # Chosen by the host config at provision (virt_accelerator); auto until then.
        accelerator=Accelerator.AUTO,
        nics=_nics(cfg, inputs),
        resources=task_resources(inputs),
        shutdown=stop_policy(inputs, graceful=True, via_agent=True),
        guest_agent=True,
        snapshot=cfg.task.snapshot,
        suspend=cfg.task.suspend,
        vmgenid="auto" if cfg.task.vmgenid or cfg.task.suspend else None,
    )


def _nics(cfg: VirtConfig, inputs: TaskInputs) -> tuple[Nic, ...]:
    """network_interface blocks; none: user-mode networking with every job port forwarded."""
    by_label = {p.label: p for p in inputs.ports}
    if not cfg.task.network_interface:
        forwards = tuple(PortForward(label=p.label, host_port=p.host_port,
                                     guest_port=p.to or p.host_port) for p in inputs.ports)
        return (UserNic(id="net0", forwards=forwards, dns_servers=inputs.dns_servers,
                        dns_searches=inputs.dns_searches),)
    nics: list[Nic] = []
    for i, iface in enumerate(cfg.task.network_interface):
        if iface.macvtap is not None:
            nics.append(MacvtapNic(id=f"net{i}", device=iface.macvtap.device,
                                   mode=iface.macvtap.mode))
            continue
        assert iface.bridge is not None
        published: list[PortForward] = []
        for label in iface.bridge.ports:
            port = by_label.get(label)
            if port is None:
                raise SpecError("port label is not declared in the job's network block",
                                where=f"{inputs.where}.config.network_interface[{i}].bridge.ports",
                                value=label, allowed=sorted(by_label) or "no ports declared")
            published.append(PortForward(label=label, host_port=port.host_port,
                                         guest_port=port.to or port.host_port))
        nics.append(TapNic(id=f"net{i}", bridge=iface.bridge.name, forwards=tuple(published)))
    return tuple(nics)


def _share_fs() -> ShareFs:
    """virtiofs where virtiofsd (and bwrap, which makes its export read-only) exist; else 9p."""
    return ShareFs.VIRTIOFS if VIRTIOFSD.exists() and shutil.which("bwrap") else ShareFs.NINEP


def _seed_request(cfg: VirtConfig, inputs: TaskInputs, alloc_id: str, *,
                  password_hash: str | None, user_data: str | None,
                  shares: tuple[GuestShare, ...] = ()) -> SeedRequest:
    task = cfg.task
    try:
        return SeedRequest(
            instance_id=default_instance_id(alloc_id, inputs.name),
            hostname=task.hostname if task.hostname is not None
            else default_hostname(inputs.name, alloc_id),
            cmds=tuple(task.cmds),
            password_hash=password_hash,
            ssh_authorized_keys=split_keys(task.default_user_authorized_ssh_key or ""),
            env=guest_env(inputs.env, shares),
            shares=shares,
            timezone=task.timezone,
            user_data=user_data,
        )
    except SpecError as exc:
        raise _in_task(exc, inputs.where) from None


def _in_task(exc: SpecError, where: str) -> SpecError:
    """A cloud-init error, its field named as the virt config names it."""
    field = exc.where
    head = field.split("[", 1)[0].split(".", 1)[0]
    field = _SEED_FIELDS.get(head, field) if head in _SEED_FIELDS else field
    place = f"{where}.{field}" if head == "env" else f"{where}.config.{field}"
    return SpecError(exc.message, where=place, value=exc.value, allowed=exc.allowed)


# Section: provisioning


def provision(cfg: VirtConfig, inputs: TaskInputs, spec: VMSpec, at: Placement) -> Provisioned:
    """Make the task's volumes and seed; the spec with its drives, seed and shares."""
    base = f"{inputs.where}.config"
    _check_provider(at.host)
    pools = Pools(check_host(at.host).storage)
    try:
        _check_local(pools, cfg.disks, base)
        shares = task_shares(_share_fs())
        if at.preview:
            return _preview(cfg, inputs, spec, at, pools, shares)
        pools.check(cfg.disks, where=f"{base}.disk")
        seed = _seed(cfg, inputs, at, shares)
        with _source_images(cfg.disks, at, base) as images:
            volumes = pools.create_task_volumes(at.alloc_id, inputs.name, cfg.disks, images,
                                                exist_ok=True, where=f"{base}.disk")
        try:
            drives = tuple(drive_for(d, v, i)
                           for i, (d, v) in enumerate(zip(cfg.disks, volumes, strict=True))
                           if v is not None)
            fields: dict[str, Any] = {k: getattr(spec, k) for k in VMSpec.model_fields}
            fields.update(drives=drives, seed=seed, shares=_spec_shares(shares, at.task_dir),
                          accelerator=Accelerator(at.host.virt_accelerator))
            return Provisioned(VMSpec(**fields), _volume_files(cfg.disks, volumes))
        except BaseException:
            pools.remove_task_volumes(at.alloc_id, inputs.name)
            raise
    finally:
        pools.close()


def _preview(cfg: VirtConfig, inputs: TaskInputs, spec: VMSpec, at: Placement, pools: Pools,
             shares: tuple[GuestShare, ...]) -> Provisioned:
    """The spec as :func:`provision` would make it, from names alone (nothing opened or made)."""
    drives = []
    for i, disk in enumerate(cfg.disks):
        pool = pools.config.get(disk.pool)
        if not isinstance(pool, DirectoryPoolConfig):
            continue
        fmt: DiskFormat = disk.format or ("raw" if disk.kind == "cdrom" else "qcow2")
        name = volume_name(at.alloc_id, inputs.name, i, fmt)
        path = Path(os.path.realpath(pool.path)) / name
        drives.append(drive_for(disk, Volume(pool.name, name, fmt, disk.size or 0, path), i))
    # Values only: no password to hash, no user_data file read (it may come with artifacts).
    req = _seed_request(cfg, inputs, at.alloc_id, password_hash=None, user_data=None,
                        shares=shares)
    seed = Seed(files=tuple((n, b.decode()) for n, b in seed_files(req).items()))
    fields: dict[str, Any] = {k: getattr(spec, k) for k in VMSpec.model_fields}
    fields.update(drives=tuple(drives), seed=seed, shares=_spec_shares(shares, at.task_dir),
                  accelerator=Accelerator(at.host.virt_accelerator))
    return Provisioned(VMSpec(**fields), tuple(Path(d.medium.path) for d in drives
                                               if isinstance(d.medium, FileMedium)))


def release(host: HostConfig, alloc_id: str, task: str) -> list[str]:
    """Remove the task's volumes from every pool; their names."""
    with Pools(check_host(host).storage) as pools:
        return pools.remove_task_volumes(alloc_id, task)


def _check_provider(host: HostConfig) -> None:
    raw = host.provider
    if not raw:
        return
    items = raw if isinstance(raw, list) else [raw]
    names = sorted({str(k) for item in items if isinstance(item, dict) for k in item}) or ["?"]
    raise HostError(f"host config: provider {names[0]!r}: {LIBVIRT_UNAVAILABLE}"
                    if names[0] == "libvirt" else
                    f"host config: provider {names[0]!r} is unknown; vmdriver runs QEMU itself "
                    "and takes no provider block")


def _check_local(pools: Pools, disks: Sequence[DiskRequest], base: str) -> None:
    """Refuse, before any pool is opened, a pool whose volumes this runtime cannot attach."""
    for i, disk in enumerate(disks):
        where = f"{base}.disk[{i}].pool"
        try:
            cfg = pools.config.get(disk.pool)
        except KeyError:
            raise SpecError("unknown storage pool", where=where, value=disk.pool,
                            allowed=pools.config.names) from None
        if cfg.kind not in ("directory", "ceph"):  # what storage.attach.drive_for attaches
            backend(cfg.kind, cfg.name)  # the registry's own error when the backend is missing
            raise HostError(f"{where}: {cfg.name!r} is a {cfg.kind} pool; this version of "
                            "vmdriver attaches only directory and ceph pool volumes to VMs")


def _volume_files(disks: Sequence[DiskRequest],
                  volumes: Sequence[Volume | None]) -> tuple[Path, ...]:
    """The files QEMU opens for this task: its volumes and their bases, nothing else of the pool."""
    out: list[Path] = []
    for disk, vol in zip(disks, volumes, strict=True):
        if vol is None or vol.path is None:
            continue
        out.append(vol.path)
        if vol.backing is not None:
            chained_on_image = disk.source is not None and disk.source.image is not None
            base_dir = vol.path.parent / META / "bases" if chained_on_image else vol.path.parent
            out.append(base_dir / vol.backing)
    return tuple(out)


def _spec_shares(shares: tuple[GuestShare, ...], task_dir: TaskDir) -> tuple[Share, ...]:
    host_dirs = {"local": task_dir.local, "alloc": task_dir.shared, "secrets": task_dir.secrets}
    return tuple(Share(tag=s.tag, path=str(host_dirs[s.tag]), read_only=True,
                       transport="virtiofs" if s.fs is ShareFs.VIRTIOFS else "9p")
                 for s in shares)


def _seed(cfg: VirtConfig, inputs: TaskInputs, at: Placement,
          shares: tuple[GuestShare, ...]) -> Seed:
    task = cfg.task
    base = f"{inputs.where}.config"
    user_data = _read_user_data(task.user_data, at.task_dir, f"{base}.user_data") \
        if task.user_data is not None else None
    password = (hash_password(task.default_user_password, where=f"{base}.default_user_password")
                if task.default_user_password is not None else None)
    req = _seed_request(cfg, inputs, at.alloc_id, password_hash=password, user_data=user_data,
                        shares=shares)
    try:
        files = seed_files(req)
    except SpecError as exc:
        raise _in_task(exc, inputs.where) from None
    return Seed(files=tuple((name, data.decode()) for name, data in files.items()))


def _read_user_data(value: str, task_dir: TaskDir, where: str) -> str:
    """The user_data file's text: a path in the task (or alloc) dir, never elsewhere on the host."""
    policy = PathPolicy(task_dir=Path(os.path.realpath(task_dir.path)),
                        alloc_dir=Path(os.path.realpath(task_dir.alloc_dir)))
    path = resolve_allowed(value, policy, where=where, what="user_data file")
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise SpecError("user_data file does not exist", where=where, value=value) from None
    except OSError as exc:
        raise SpecError(f"user_data file cannot be read: {exc.strerror}", where=where,
                        value=value) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SpecError("user_data is not a regular file", where=where, value=value)
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_USER_DATA + 1)
    if len(data) > MAX_USER_DATA:
        raise SpecError("user_data file is larger than 1 MiB", where=where, value=value)
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise SpecError("user_data file is not UTF-8 text", where=where, value=value) from None


@contextlib.contextmanager
def _source_images(disks: Sequence[DiskRequest], at: Placement,
                   base: str) -> Iterator[dict[int, SourceImage]]:
    """Each ``source.image`` opened through the image policy (as ``image_path`` is), by disk."""
    policy = PathPolicy.for_task(at.task_dir.path, at.task_dir.alloc_dir, at.host)
    opened: list[OpenedImage] = []
    images: dict[int, SourceImage] = {}
    try:
        for i, disk in enumerate(disks):
            src = disk.source
            if src is None or src.image is None:
                continue
            where = f"{base}.disk[{i}].source.image"
            image, fmt = checked_image(src.image, policy, fmt=src.format, writable=False,
                                       where=where)
            opened.append(image)
            # The policy checked the whole backing chain (an artifact overlay on the cache).
            images[i] = SourceImage(image.ro_fd, fmt=fmt, where=where, display=src.image,
                                    allow_backing=True)
        yield images
    finally:
        for img in images.values():
            img.close()
        for image in opened:
            image.close()
