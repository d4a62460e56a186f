"""Reading an ``artifact`` block: where the bytes come from, how to check and unpack them,
and where they land in the task dir.

go-getter conventions kept: ``?checksum=type:hex`` and ``?archive=`` in the URL (or the
same keys in ``options``) are options, not part of what is requested; the archive type
comes from the file name unless ``archive`` names one (``archive=false`` keeps the file
as it is).
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from vmdriver.artifacts.archive import ArchiveKind, kind_from_name, kind_from_option, strip_suffix
from vmdriver.artifacts.checksum import Checksum, ChecksumSyntaxError, parse_checksum
from vmdriver.errors import ArtifactError, InputError
from vmdriver.policy.paths import MAGIC_ROOTS, walk
from vmdriver.spec import ArtifactSpec


class ArtifactRefused(ArtifactError):
    """An artifact block refused before anything is fetched: bad input, exit status 2."""

    exit_status = 2


#: Options an artifact may carry (in ``options {}`` or the URL's query).
OPTIONS = ("checksum", "archive")
SCHEMES = ("http", "https", "file")
#: A header name (RFC 9110 token) and value (visible ASCII and spaces: no CR, LF or NUL).
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$", re.ASCII)
_HEADER_VALUE = re.compile(r"^[\x20-\x7e\t]{0,8192}$", re.ASCII)


@dataclass(frozen=True)
class Source:
    """One artifact, checked and resolved; nothing fetched yet."""

    #: How errors and progress name the artifact (credentials removed).
    display: str
    #: ``http`` (http and https) or ``file``.
    kind: Literal["http", "file"]
    #: What to request: the URL without go-getter options, or a local path.
    location: str
    headers: tuple[tuple[str, str], ...]
    checksum: Checksum | None
    #: ``None``: keep the file as it is.
    archive: ArchiveKind | None
    #: A directory to unpack or save into (``is_dir``), else the file to write.
    target: Path
    is_dir: bool
    #: The name a single file gets inside ``target`` when ``is_dir``.
    file_name: str
    #: Where a ``file`` source may lie (the job file's dir, ``image_paths``), resolved.
    roots: tuple[Path, ...] = ()

    @property
    def local_path(self) -> Path:
        """The file a ``file`` source reads."""
        return Path(self.location)


def redact(url: str) -> str:
    """The URL without a password, for messages."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def _options(spec: ArtifactSpec, query: list[tuple[str, str]], display: str) -> dict[str, str]:
    """Merge ``options {}`` with the URL's go-getter keys; a key given twice must agree."""
    merged: dict[str, str] = {}
    for key, value in query:
        if key in OPTIONS:
            merged[key] = value
    for key, value in spec.options:
        if key not in OPTIONS:
            raise ArtifactRefused(display, f"unknown option {key!r} (allowed: {', '.join(OPTIONS)})")
        if key in merged and merged[key] != value:
            raise ArtifactRefused(display, f"option {key!r} is given in the URL and in options "
                                         "with different values")
        merged[key] = value
    return merged


def _target(spec: ArtifactSpec, task_dir: Path, display: str) -> Path:
    """The destination, read lexically: it must stay inside the task dir.

    Links are not resolved here: the destination is walked when it is written, and
    a symlink on the way (planted by an earlier artifact) is refused then.
    """
    if Path(spec.destination).is_absolute() or "\x00" in spec.destination:
        raise ArtifactRefused(display, f"destination {spec.destination!r} must be relative to the "
                                     "task dir")
    root = task_dir.resolve()
    target = Path(os.path.normpath(root / spec.destination))
    # Checked now (nothing fetched for a bad one) and walked again as it is written.
    for seen in (target, (root / spec.destination).resolve()):
        if seen != root and root not in seen.parents:
            raise ArtifactRefused(display, f"destination {spec.destination!r} leaves the task dir")
    return target


def _text_ok(spec: ArtifactSpec) -> None:
    """URLs and headers are ASCII without control characters (httpx would raise on them)."""
    shown = spec.source.encode("unicode_escape").decode()[:200]  # one line, whatever it holds
    if not spec.source.isascii() or any(ord(c) < 32 or ord(c) == 127 for c in spec.source):
        raise ArtifactRefused(shown, "source holds non-ASCII or control characters "
                                   "(percent-encode them)")
    for name, value in spec.headers:
        if not _HEADER_NAME.match(name) or not _HEADER_VALUE.match(value):
            raise ArtifactRefused(shown, f"header {name[:64]!r} is not a valid HTTP header "
                                       "(ASCII name; value without CR, LF, NUL or non-ASCII)")


def open_local(src: Source) -> int:
    """Open a ``file`` source once, checked again as opened (it may have been swapped).

    ``O_NOFOLLOW`` refuses a symlink put in its place; the path the kernel gives
    for the open file must still lie in the source's roots, which catches a
    directory above it swapped for a link. The caller reads the fd, never the path.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(src.location, flags)
    except FileNotFoundError:
        raise ArtifactRefused(src.display, f"no such file: {src.location}") from None
    except OSError as exc:
        raise ArtifactRefused(src.display, f"cannot open {src.location}: {exc.strerror}") from None
    real = Path(os.readlink(f"/proc/self/fd/{fd}"))
    if not stat.S_ISREG(os.fstat(fd).st_mode) or \
            not any(real == r or r in real.parents for r in src.roots):
        os.close(fd)
        raise ArtifactRefused(src.display, "file source is not a regular file in the job "
                                           "file's dir or image_paths (changed after its check?)")
    os.set_blocking(fd, True)
    return fd


def confine_local(path: Path, display: str, dirs: tuple[Path, ...]) -> Path:
    """The resolved ``path`` if it lies in one of ``dirs`` (the job file's dir, ``image_paths``).

    Resolved the way the kernel would, link by link, refusing ``/proc``, ``/sys``
    and ``/dev/fd`` anywhere on the way: a job file may not read host files
    outside the places its author and the operator put there.
    """
    try:
        resolved = walk(path if path.is_absolute() else Path.cwd() / path, where=display,
                        value=str(path))
    except InputError as exc:
        raise ArtifactRefused(display, exc.message) from None
    if any(resolved == m or m in resolved.parents for m in MAGIC_ROOTS):
        raise ArtifactRefused(display, "a file source may not read /proc, /sys or /dev/fd")
    roots = [Path(os.path.realpath(d)) for d in dirs]
    if not any(resolved == r or r in resolved.parents for r in roots):
        raise ArtifactRefused(display, f"file source {str(path)!r} lies outside the job file's "
                                     "dir and image_paths")
    return resolved


def parse_source(spec: ArtifactSpec, task_dir: Path, job_dir: Path, *,
                 image_paths: tuple[Path, ...] = (),
                 getters: tuple[str, ...] = ("http", "https")) -> Source:
    """Check an artifact block and decide everything about it that needs no network.

    A local file must lie in ``job_dir`` or ``image_paths``; a URL's scheme must
    be one of ``getters`` (the operator's ``artifact_getters``).
    """
    _text_ok(spec)
    raw = spec.source.strip()
    if "::" in raw.split("/", 1)[0]:  # go-getter's forced getter, e.g. "git::https://..."
        forced, _, raw = raw.partition("::")
        if forced not in SCHEMES:
            raise ArtifactRefused(redact(spec.source), f"getter {forced!r} is not supported "
                                                     f"(allowed: {', '.join(SCHEMES)})")
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter is no scheme; paths here are POSIX
        scheme = ""
    # Messages name the artifact without go-getter options or credentials.
    display = redact(urlunsplit(parts._replace(query=urlencode(
        [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in OPTIONS]))))
    if scheme and scheme not in SCHEMES:
        raise ArtifactRefused(display, f"scheme {scheme!r} is not supported "
                                     f"(allowed: {', '.join(SCHEMES)}, or a path)")
    query = parse_qsl(parts.query, keep_blank_values=True)
    opts = _options(spec, query, display)
    rest = [(k, v) for k, v in query if k not in OPTIONS]
    roots = (job_dir, *image_paths)
    if scheme in ("http", "https") and scheme not in getters:
        raise ArtifactRefused(display, f"scheme {scheme!r} is not allowed on this host "
                                     f"(artifact_getters: {', '.join(getters) or 'none'})")
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise ArtifactRefused(display, "URL has no host")
        kind: Literal["http", "file"] = "http"
        location = urlunsplit((scheme, parts.netloc, parts.path, urlencode(rest), ""))
        name = posixpath.basename(unquote(parts.path))
    else:
        kind = "file"
        path = Path(unquote(parts.path) if scheme == "file" else raw.split("?", 1)[0])
        location = str(confine_local(path if path.is_absolute() else job_dir / path, display,
                                     roots))
        name = path.name
    try:
        checksum = parse_checksum(opts["checksum"]) if opts.get("checksum") else None
    except ChecksumSyntaxError as exc:
        raise ArtifactRefused(display, str(exc)) from None
    archive = _archive(opts.get("archive"), name, display)
    target = _target(spec, task_dir, display)
    file_name = strip_suffix(name, archive) if archive and archive.single else name
    return _with_mode(spec, Source(
        display=display, kind=kind, location=location, headers=spec.headers, checksum=checksum,
        archive=archive, target=target, is_dir=True, file_name=file_name,
        roots=tuple(Path(os.path.realpath(r)) for r in roots) if kind == "file" else (),
    ))


def _archive(option: str | None, name: str, display: str) -> ArchiveKind | None:
    if option is None or option == "":
        return kind_from_name(name)
    try:
        return kind_from_option(option)
    except ValueError as exc:
        raise ArtifactRefused(display, str(exc)) from None


def _with_mode(spec: ArtifactSpec, src: Source) -> Source:
    """Apply ``mode``: ``file`` writes one file, ``dir`` unpacks, ``any`` decides by the source."""
    unpacks = src.archive is not None and not src.archive.single
    if spec.mode == "dir" and not unpacks:
        raise ArtifactRefused(src.display, 'mode "dir" needs an archive (tar or zip) source')
    if spec.mode == "file":
        if unpacks:
            raise ArtifactRefused(src.display, 'mode "file" cannot unpack a tar or zip archive; '
                                             'use mode "dir" or archive=false')
        # Nomad's legacy image_source uses destination "local/": a directory for the file.
        as_dir = spec.destination.endswith("/") or src.target.is_dir()
        if not as_dir:
            return replace(src, is_dir=False)
    if not unpacks and not src.file_name:
        raise ArtifactRefused(src.display, 'the URL names no file; use mode "file" with a '
                                         "destination file name")
    return src
