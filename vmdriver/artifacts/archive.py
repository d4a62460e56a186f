"""Archives and compressed files: tar (plain, gz, bz2, xz, zst), zip, and single files
compressed with gz, bz2, xz or zst.

Unpacking refuses entries that would land outside the destination: absolute
names, ``..``, links pointing out, device files. Every entry is then written
through a confined walk (:mod:`vmdriver.artifacts.beneath`): no symlink on the way
is followed, so a link planted by an earlier entry cannot redirect a later write.
Sizes, the ratio to the archive and the entry count are bounded
(:mod:`vmdriver.artifacts.limits`).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from vmdriver.artifacts import beneath
from vmdriver.artifacts.limits import ArtifactLimits, Budget
from vmdriver.artifacts.transfer import CHUNK, CountingReader, ProgressFn, Sink, check_cancel
from vmdriver.errors import ArtifactError


@dataclass(frozen=True)
class ArchiveKind:
    """What a file is packed as."""

    #: Canonical name, as accepted by ``archive=``.
    name: str
    #: ``tar``, ``zip``, or ``None`` for a single compressed file.
    container: str | None
    #: ``gz``, ``bz2``, ``xz``, ``zst`` or ``None``.
    compression: str | None

    @property
    def single(self) -> bool:
        """A single compressed file (``disk.qcow2.xz``), not a tree."""
        return self.container is None


KINDS = {k.name: k for k in (
    ArchiveKind("tar", "tar", None), ArchiveKind("tar.gz", "tar", "gz"),
    ArchiveKind("tar.bz2", "tar", "bz2"), ArchiveKind("tar.xz", "tar", "xz"),
    ArchiveKind("tar.zst", "tar", "zst"), ArchiveKind("zip", "zip", None),
    ArchiveKind("gz", None, "gz"), ArchiveKind("bz2", None, "bz2"),
    ArchiveKind("xz", None, "xz"), ArchiveKind("zst", None, "zst"),
)}
#: File name endings, longest first so ``.tar.gz`` wins over ``.gz``.
SUFFIXES = (
    (".tar.gz", "tar.gz"), (".tar.bz2", "tar.bz2"), (".tar.xz", "tar.xz"),
    (".tar.zst", "tar.zst"), (".tgz", "tar.gz"), (".tbz2", "tar.bz2"), (".tbz", "tar.bz2"),
    (".txz", "tar.xz"), (".tzst", "tar.zst"), (".tar", "tar"), (".zip", "zip"),
    (".gz", "gz"), (".bz2", "bz2"), (".xz", "xz"), (".zst", "zst"),
)
_ALIASES = {suffix.lstrip("."): name for suffix, name in SUFFIXES}


def kind_from_name(name: str) -> ArchiveKind | None:
    """The kind a file name says, or ``None`` for a plain file."""
    lower = name.lower()
    return next((KINDS[k] for suffix, k in SUFFIXES if lower.endswith(suffix)), None)


def kind_from_option(option: str) -> ArchiveKind | None:
    """The value of ``archive=``: a kind, or ``false`` to keep the file as it is."""
    value = option.strip().lower()
    if value in ("false", "0", "no"):
        return None
    if value in _ALIASES:
        return KINDS[_ALIASES[value]]
    raise ValueError(f"unknown archive type {option!r} (allowed: false, {', '.join(KINDS)})")


def strip_suffix(name: str, kind: ArchiveKind) -> str:
    """``disk.qcow2.xz`` → ``disk.qcow2``; a name without the suffix stays as it is."""
    lower = name.lower()
    for suffix, k in SUFFIXES:
        if k == kind.name and lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


@contextlib.contextmanager
def _decompressed(raw: BinaryIO, compression: str | None) -> Iterator[BinaryIO]:
    if compression is None:
        yield raw
    elif compression == "gz":
        with gzip.GzipFile(fileobj=raw, mode="rb") as f:
            yield cast(BinaryIO, f)
    elif compression == "bz2":
        with bz2.BZ2File(raw, "rb") as f:
            yield cast(BinaryIO, f)
    elif compression == "xz":
        with lzma.LZMAFile(raw, "rb") as f:
            yield cast(BinaryIO, f)
    else:
        with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as f:
            yield cast(BinaryIO, f)


# Errors each decompressor raises on corrupt input.
_CORRUPT = (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError, tarfile.TarError,
            zipfile.BadZipFile)


def _copy(src: BinaryIO, sink: Sink, budget: Budget, cancel: threading.Event | None) -> None:
    while True:
        check_cancel(cancel)
        data = src.read(CHUNK)
        if not data:
            return
        budget.add(len(data))
        sink.write(data)


def decompress(src: Path, dest: Path, kind: ArchiveKind, display: str, *,
               progress: ProgressFn | None = None, cancel: threading.Event | None = None,
               limits: ArtifactLimits | None = None) -> None:
    """Write the single file compressed in ``src`` to ``dest`` (holes kept)."""
    sink = Sink(dest, None)
    budget = Budget(limits or ArtifactLimits(), src.stat().st_size)
    try:
        with open(src, "rb") as raw, _decompressed(
                cast(BinaryIO, CountingReader(raw, progress, cancel)), kind.compression) as f:
            _copy(f, sink, budget, cancel)
        sink.close()
    except _CORRUPT as exc:
        sink.abort()
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # a real I/O error (disk full), not corrupt input
        raise ArtifactError(display, f"cannot decompress ({kind.name}): {exc}") from None
    except BaseException:
        sink.abort()
        raise


def unpack(src: Path, dest: Path, kind: ArchiveKind, display: str, *,
           progress: ProgressFn | None = None, cancel: threading.Event | None = None,
           limits: ArtifactLimits | None = None) -> None:
    """Unpack a tar or zip archive into the empty directory ``dest``."""
    budget = Budget(limits or ArtifactLimits(), src.stat().st_size)
    try:
        if kind.container == "zip":
            _unzip(src, dest, display, progress, cancel, budget)
            return
        with open(src, "rb") as raw, _decompressed(
                cast(BinaryIO, CountingReader(raw, progress, cancel)), kind.compression) as f, \
                tarfile.open(fileobj=f, mode="r|") as tar, beneath.root_fd(str(dest)) as root:
            for member in tar:
                check_cancel(cancel)
                budget.entry()
                _check_tar_member(member, display)
                _write_member(tar, member, root, display, budget, cancel)
    except _CORRUPT as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise ArtifactError(display, f"cannot unpack ({kind.name}): {exc}") from None


def _inside(name: str) -> bool:
    """A relative name that stays inside the destination, however it is spelled."""
    norm = posixpath.normpath(name.replace("\\", "/"))
    return not (name.startswith(("/", "\\")) or norm == ".." or norm.startswith("../"))


def _check_tar_member(m: tarfile.TarInfo, display: str) -> None:
    if not _inside(m.name):
        raise ArtifactError(display, f"archive entry {m.name!r} would land outside the "
                                     "destination")
    if m.ischr() or m.isblk() or m.isfifo():
        raise ArtifactError(display, f"archive entry {m.name!r} is a device or fifo; refused")
    if m.issym():
        target = posixpath.join(posixpath.dirname(m.name), m.linkname)
        if m.linkname.startswith("/") or not _inside(target):
            raise ArtifactError(display, f"archive entry {m.name!r} is a symlink pointing "
                                         f"outside the destination ({m.linkname!r})")
    if m.islnk() and not _inside(m.linkname):
        raise ArtifactError(display, f"archive entry {m.name!r} is a hard link to "
                                     f"{m.linkname!r}, outside the destination")


def _write_member(tar: tarfile.TarFile, m: tarfile.TarInfo, root: int, display: str,
                  budget: Budget, cancel: threading.Event | None) -> None:
    """Write one checked tar entry below ``root``, following no symlink on the way."""
    parts = beneath.components(m.name, display)
    if not parts or m.isdir():
        with beneath.open_dir(root, parts, display):
            return
    with beneath.open_dir(root, parts[:-1], display) as parent:
        name = parts[-1]
        if m.issym():
            beneath.clear(parent, name)
            os.symlink(m.linkname, name, dir_fd=parent)
        elif m.islnk():
            target = beneath.components(m.linkname, display)
            with beneath.open_dir(root, target[:-1], display, create=False) as there:
                beneath.clear(parent, name)
                os.link(target[-1], name, src_dir_fd=there, dst_dir_fd=parent,
                        follow_symlinks=False)
        elif m.isreg():
            fd = beneath.create_file(parent, name, 0o755 if m.mode & 0o111 else 0o644)
            sink = Sink(Path(m.name), None, fd=fd)
            try:
                data = tar.extractfile(m)
                assert data is not None
                _copy(cast(BinaryIO, data), sink, budget, cancel)
                sink.close()
            finally:
                sink.abort()
        else:
            raise ArtifactError(display, f"archive entry {m.name!r} is not a file, directory "
                                         "or link; refused")


def _unzip(src: Path, dest: Path, display: str, progress: ProgressFn | None,
           cancel: threading.Event | None, budget: Budget) -> None:
    with zipfile.ZipFile(src) as zf:
        infos = zf.infolist()
        for _ in infos:
            budget.entry()
        for info in infos:  # check all first: nothing is written from a hostile archive
            mode = info.external_attr >> 16
            if not _inside(info.filename) or ":" in info.filename.split("/")[0]:
                raise ArtifactError(display, f"archive entry {info.filename!r} would land "
                                             "outside the destination")
            if stat.S_ISLNK(mode):
                raise ArtifactError(display, f"archive entry {info.filename!r} is a symlink; "
                                             "zip symlinks are refused")
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                raise ArtifactError(display, f"archive entry {info.filename!r} is a device or "
                                             "fifo; refused")
        with beneath.root_fd(str(dest)) as root:
            for info in infos:
                check_cancel(cancel)
                _unzip_one(zf, info, root, display, budget, cancel)
                if progress:
                    progress(info.compress_size)


def _unzip_one(zf: zipfile.ZipFile, info: zipfile.ZipInfo, root: int, display: str,
               budget: Budget, cancel: threading.Event | None) -> None:
    parts = beneath.components(info.filename, display)
    if info.is_dir() or not parts:
        with beneath.open_dir(root, parts, display):
            return
    with beneath.open_dir(root, parts[:-1], display) as parent:
        mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
        sink = Sink(Path(info.filename), None, fd=beneath.create_file(parent, parts[-1], mode))
        try:
            with zf.open(info) as f:
                _copy(cast(BinaryIO, f), sink, budget, cancel)
            sink.close()
        finally:
            sink.abort()


def move_tree(src: Path, dest: Path) -> list[Path]:
    """Move what ``src`` holds into ``dest``, merging directories, replacing files."""
    dest.mkdir(parents=True, exist_ok=True)
    moved = []
    for entry in sorted(src.iterdir()):
        target = dest / entry.name
        if entry.is_dir() and not entry.is_symlink() and target.is_dir() \
                and not target.is_symlink():
            move_tree(entry, target)
        else:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            entry.replace(target)
        moved.append(target)
    return moved

