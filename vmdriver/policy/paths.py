"""Where a job's files may come from, decided on resolved paths, never on strings.

A path is allowed when, after resolving ``..`` and every symlink, it lies in:

the task dir, the allocation's shared ``alloc/`` dir or an ``image_paths`` entry.
A sibling task's dir (its ``secrets/``) is not reachable through the alloc dir. A relative path is
taken from the task dir (QEMU's working directory) and may not climb out of it
with ``..``; a symlink may lead anywhere allowed, and nowhere else.

The walk is done here, one component at a time, so a path that passes through
``/proc``, ``/sys`` or ``/dev/fd`` *anywhere* (``/proc/self/root/...``, or a
symlink in the task dir pointing at ``/proc/self/fd/3``) is refused: their
"symlinks" are kernel magic whose target text is not where they lead.

Images are then opened once (:func:`open_image`) and QEMU gets the open file,
so a path swapped after the check cannot change what the VM reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vmdriver.errors import PolicyError, SpecError
from vmdriver.host.config import HostConfig

#: Trees whose entries are kernel objects, not files: never reachable from a job.
MAGIC_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev/fd"), Path("/dev/fdset"))
#: Device files an option value may name anywhere (``rng-random,filename=/dev/urandom``).
SAFE_DEVICES = frozenset(map(Path, ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")))
#: As the kernel's ELOOP limit.
MAX_SYMLINKS = 40


def _is_under(path: Path, base: Path) -> bool:
    """True if ``path`` is ``base`` or inside it (component-wise: /opt/qemu-x is not in /opt/qemu)."""
    return path == base or base in path.parents


def _magic(path: Path) -> bool:
    return any(_is_under(path, root) for root in MAGIC_ROOTS)


@dataclass(frozen=True)
class PathPolicy:
    """The directories one task's files may come from, each already resolved."""

    task_dir: Path
    alloc_dir: Path
    image_paths: tuple[Path, ...] = ()
    #: The operator's spelling of ``image_paths``, for messages.
    image_paths_text: tuple[str, ...] = ()
    #: Dirs allowed for backing files only: the shared artifact cache. QEMU opens
    #: backing files read-only; a job can never name them as a writable image.
    backing_dirs: tuple[Path, ...] = ()
    #: Dirs whose images are shared by jobs: never opened read-write (a job writes to a
    #: per-task overlay instead). Set by :meth:`for_task` with ``shared_read_only``.
    read_only_dirs: tuple[Path, ...] = ()

    @classmethod
    def for_task(cls, task_dir: Path, alloc_dir: Path, host: HostConfig, *,
                 volume_dirs: tuple[Path, ...] = (),
                 shared_read_only: bool = False) -> PathPolicy:
        """Resolve the task dir, alloc dir and ``image_paths`` once (the operator's symlinks count).

        ``volume_dirs`` are this VM's own image dirs (its pool volumes), writable;
        with ``shared_read_only``, images under the operator's ``image_paths`` are
        opened read-only whatever the drive asks.
        """
        shared = tuple(Path(os.path.realpath(p)) for p in host.image_paths)
        return cls(
            task_dir=Path(os.path.realpath(task_dir)),
            alloc_dir=Path(os.path.realpath(alloc_dir)),
            image_paths=(*shared, *(Path(os.path.realpath(p)) for p in volume_dirs)),
            image_paths_text=(*host.image_paths, *map(str, volume_dirs)),
            read_only_dirs=shared if shared_read_only else (),
            # Where vmdriver.artifacts keeps its cache (artifacts.cache.default_cache_dir),
            # and the memory snapshots' frozen disks (runtime.snapstore).
            backing_dirs=(Path(os.path.realpath(host.state_dir / "cache")),
                          Path(os.path.realpath(host.state_dir / "snapshots"))),
        )

    def for_backing(self) -> PathPolicy:
        """The policy for backing files: the same dirs plus the artifact cache."""
        return dataclasses.replace(
            self,
            image_paths=(*self.image_paths, *self.backing_dirs),
            image_paths_text=(*self.image_paths_text, *(str(d) for d in self.backing_dirs)),
            backing_dirs=(),
        )

    def allowed(self) -> str:
        """Where a path may lead, for an error's ``allowed`` part."""
        return ", ".join(["the task dir", "the alloc dir's shared alloc/",
                          *self.image_paths_text])

    @property
    def shared_dir(self) -> Path:
        """The allocation's shared ``alloc/`` dir: the only part of the alloc dir a task may name."""
        return self.alloc_dir / "alloc"

    def contains(self, path: Path) -> bool:
        """True if the resolved ``path`` lies in the task dir, ``alloc/`` or an image path."""
        bases = (self.task_dir, self.shared_dir, *self.image_paths)
        return any(_is_under(path, b) for b in bases)

    def shared_image(self, path: Path) -> bool:
        """True if ``path`` is an image other jobs boot too (read-only for this one)."""
        own = (self.task_dir, self.shared_dir)
        return not any(_is_under(path, b) for b in own) and \
            any(_is_under(path, b) for b in self.read_only_dirs)


def walk(path: Path, *, where: str, value: str) -> Path:
    """Resolve an absolute ``path`` like the kernel would, refusing magic trees on the way.

    Components that do not exist are kept as written (an output file QEMU will
    create); ``..`` after them is applied lexically, as ``realpath`` does.
    """
    parts = list(path.parts[1:])
    resolved = Path("/")
    links = 0
    exists = True
    while parts:
        name = parts.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            resolved = resolved.parent
            continue
        nxt = resolved / name
        if _magic(nxt):
            raise PolicyError("path leads into /proc, /sys or /dev/fd", where=where, value=value)
        if not exists:
            resolved = nxt
            continue
        try:
            st = os.lstat(nxt)
        except (FileNotFoundError, NotADirectoryError):
            exists, resolved = False, nxt
            continue
        except (OSError, ValueError) as exc:
            raise SpecError(f"path cannot be resolved: {getattr(exc, 'strerror', None) or exc}",
                            where=where, value=value) from None
        if not stat.S_ISLNK(st.st_mode):
            resolved = nxt
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise SpecError("too many levels of symbolic links", where=where, value=value)
        try:
            target = PurePosixPath(os.readlink(nxt))
        except OSError as exc:
            raise SpecError(f"path cannot be resolved: {exc.strerror}", where=where,
                            value=value) from None
        if target.is_absolute():
            resolved, parts = Path("/"), [*target.parts[1:], *parts]
        else:
            parts = [*target.parts, *parts]
    return resolved


def resolve_allowed(value: str, policy: PathPolicy, *, where: str, what: str = "path",
                    devices_ok: bool = False) -> Path:
    """The resolved path ``value`` names, if policy lets a job reach it; else raise.

    ``devices_ok`` admits :data:`SAFE_DEVICES` (for option values, never images).
    """
    if not isinstance(value, str) or not value or "\x00" in value:
        raise SpecError(f"{what} must be a non-empty path without NUL bytes", where=where,
                        value=value)
    raw = Path(value)
    relative = not raw.is_absolute()
    candidate = policy.task_dir / raw if relative else raw
    if len(os.fsencode(candidate)) > 4096:
        raise SpecError(f"{what} is longer than a path can be", where=where, value=value[:80])
    if _magic(Path(os.path.normpath(candidate))):
        raise PolicyError(f"{what} leads into /proc, /sys or /dev/fd", where=where, value=value)
    if relative and os.path.normpath(raw).split(os.sep, 1)[0] == "..":
        raise PolicyError(f"relative {what} climbs out of the task dir", where=where,
                          value=value, allowed="a path inside the task dir")
    resolved = walk(candidate, where=where, value=value)
    if devices_ok and resolved in SAFE_DEVICES:
        return resolved
    if not policy.contains(resolved):
        msg = f"{what} leads outside the allowed dirs"
        if resolved != Path(os.path.normpath(candidate)):
            msg += f" (to {resolved})"
        raise PolicyError(msg, where=where, value=value, allowed=policy.allowed())
    return resolved


def check_image_path(image: str, task_dir: Path, alloc_dir: Path, host: HostConfig, *,
                     where: str = "image_path", must_exist: bool = True) -> Path:
    """Resolve ``image`` and return it if policy allows it; relative paths live in the task dir.

    With ``must_exist`` (the default), the image must be an existing regular file:
    directories, devices, FIFOs and sockets are refused. Without it (``vmdriver
    argv`` before artifacts are fetched), only where the path leads is checked.
    """
    policy = PathPolicy.for_task(task_dir, alloc_dir, host)
    resolved = resolve_allowed(image, policy, where=where, what="image path")
    return check_regular_file(resolved, where=where, value=image) if must_exist else resolved


def check_regular_file(resolved: Path, *, where: str, value: str) -> Path:
    """``resolved`` if it is an existing regular file (not a dir, device, FIFO or socket)."""
    try:
        st = os.stat(resolved)
    except FileNotFoundError:
        raise SpecError("image file does not exist", where=where, value=value) from None
    except OSError as exc:
        raise SpecError(f"image cannot be read: {exc.strerror}", where=where, value=value) from None
    if stat.S_ISDIR(st.st_mode):
        raise SpecError("image path is a directory, not a file", where=where, value=value)
    if not stat.S_ISREG(st.st_mode):
        raise SpecError("image path is not a regular file (devices, FIFOs and sockets are "
                        "refused)", where=where, value=value)
    return resolved


@dataclass
class OpenedImage:
    """An image opened once after its check; QEMU gets these fds, never the path."""

    path: Path
    #: Read-only fd, always open.
    ro_fd: int
    #: Read-write fd of the same file, for a writable drive.
    rw_fd: int | None = None

    @property
    def fds(self) -> tuple[int, ...]:
        """Every fd, read-only first."""
        return (self.ro_fd,) if self.rw_fd is None else (self.ro_fd, self.rw_fd)

    def close(self) -> None:
        """Close both fds (idempotent)."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.ro_fd, self.rw_fd = -1, None


def open_image(resolved: Path, policy: PathPolicy, *, writable: bool, where: str,
               value: str) -> OpenedImage:
    """Open a checked image and verify the open file is still an allowed regular file.

    ``O_NOFOLLOW`` stops a symlink swapped in at the last component; the path the
    kernel reports for the open fd (``/proc/self/fd/N``) is checked again, which
    catches a directory swapped anywhere above it. The read-write fd is opened
    through that fd, so both name the very same inode.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(resolved, flags)
    except OSError as exc:
        raise SpecError(f"image cannot be opened: {exc.strerror}", where=where,
                        value=value) from None
    image = OpenedImage(resolved, fd)
    try:
        _verify_open(image, policy, writable=writable, where=where, value=value)
    except BaseException:
        image.close()
        raise
    return image


def local_path(value: str, *, where: str) -> str:
    """The file path in a block-layer filename, refusing protocols (``nbd:``, ``json:``...).

    QEMU reads ``proto:rest`` as a protocol when the ``:`` comes before any ``/``;
    ``file:`` is the local file protocol, so ``file:/x`` is the path ``/x``.
    """
    head = value.split("/", 1)[0]
    if ":" not in head:
        return value
    proto = head.split(":", 1)[0]
    if proto == "file":
        return value[len("file:"):]
    raise PolicyError(f"protocol {proto + ':'!r} is not allowed where a file path goes",
                      where=where, value=value, allowed="local file paths")


def _verify_open(image: OpenedImage, policy: PathPolicy, *, writable: bool, where: str,
                 value: str) -> None:
    fd = image.ro_fd
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise SpecError("image path is not a regular file", where=where, value=value)
    real = os.readlink(f"/proc/self/fd/{fd}")
    if real.endswith(" (deleted)") or not policy.contains(Path(real)):
        raise PolicyError("image changed while it was being opened", where=where, value=value)
    # O_NONBLOCK only guarded the open against a FIFO swapped in; QEMU wants blocking I/O.
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    if writable and policy.shared_image(Path(real)):
        raise PolicyError("a shared image under image_paths is never opened for writing",
                          where=where, value=value,
                          allowed="a read-only drive, or a per-task overlay on the image")
    if writable:
        try:
            image.rw_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise SpecError(f"image cannot be opened for writing: {exc.strerror}",
                            where=where, value=value) from None
