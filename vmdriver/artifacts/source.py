"""Reading an ``artifact`` block: where the bytes come from, how to check and unpack them,
and where they land in the task dir.

go-getter conventions kept: ``?checksum=type:hex`` and ``?archive=`` in the URL (or the
same keys in ``options``) are options, not part of what is requested; the archive type
comes from the file name unless ``archive`` names one (``archive=false`` keeps the file
as it is).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from vmdriver.artifacts.archive import ArchiveKind, kind_from_name, kind_from_option, strip_suffix
from vmdriver.artifacts.checksum import Checksum, ChecksumSyntaxError, parse_checksum
from vmdriver.errors import ArtifactError
from vmdriver.spec import ArtifactSpec

#: Options an artifact may carry (in ``options {}`` or the URL's query).
OPTIONS = ("checksum", "archive")
SCHEMES = ("http", "https", "file")


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
            raise ArtifactError(display, f"unknown option {key!r} (allowed: {', '.join(OPTIONS)})")
        if key in merged and merged[key] != value:
            raise ArtifactError(display, f"option {key!r} is given in the URL and in options "
                                         "with different values")
        merged[key] = value
    return merged


def _target(spec: ArtifactSpec, task_dir: Path, display: str) -> Path:
    """The destination, which must stay inside the task dir once ``..`` and links resolve."""
    if Path(spec.destination).is_absolute():
        raise ArtifactError(display, f"destination {spec.destination!r} must be relative to the "
                                     "task dir")
    root = task_dir.resolve()
    target = (root / spec.destination).resolve()
    if target != root and root not in target.parents:
        raise ArtifactError(display, f"destination {spec.destination!r} leaves the task dir")
    return target


def parse_source(spec: ArtifactSpec, task_dir: Path, job_dir: Path) -> Source:
    """Check an artifact block and decide everything about it that needs no network."""
    raw = spec.source.strip()
    if "::" in raw.split("/", 1)[0]:  # go-getter's forced getter, e.g. "git::https://..."
        forced, _, raw = raw.partition("::")
        if forced not in SCHEMES:
            raise ArtifactError(redact(spec.source), f"getter {forced!r} is not supported "
                                                     f"(allowed: {', '.join(SCHEMES)})")
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter is no scheme; paths here are POSIX
        scheme = ""
    # Messages name the artifact without go-getter options or credentials.
    display = redact(urlunsplit(parts._replace(query=urlencode(
        [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in OPTIONS]))))
    if scheme and scheme not in SCHEMES:
        raise ArtifactError(display, f"scheme {scheme!r} is not supported "
                                     f"(allowed: {', '.join(SCHEMES)}, or a path)")
    query = parse_qsl(parts.query, keep_blank_values=True)
    opts = _options(spec, query, display)
    rest = [(k, v) for k, v in query if k not in OPTIONS]
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise ArtifactError(display, "URL has no host")
        kind: Literal["http", "file"] = "http"
        location = urlunsplit((scheme, parts.netloc, parts.path, urlencode(rest), ""))
        name = posixpath.basename(unquote(parts.path))
    else:
        kind = "file"
        path = Path(unquote(parts.path) if scheme == "file" else raw.split("?", 1)[0])
        location = str(path if path.is_absolute() else (job_dir / path).resolve())
        name = path.name
    try:
        checksum = parse_checksum(opts["checksum"]) if opts.get("checksum") else None
    except ChecksumSyntaxError as exc:
        raise ArtifactError(display, str(exc)) from None
    archive = _archive(opts.get("archive"), name, display)
    target = _target(spec, task_dir, display)
    file_name = strip_suffix(name, archive) if archive and archive.single else name
    return _with_mode(spec, Source(
        display=display, kind=kind, location=location, headers=spec.headers, checksum=checksum,
        archive=archive, target=target, is_dir=True, file_name=file_name,
    ))


def _archive(option: str | None, name: str, display: str) -> ArchiveKind | None:
    if option is None or option == "":
        return kind_from_name(name)
    try:
        return kind_from_option(option)
    except ValueError as exc:
        raise ArtifactError(display, str(exc)) from None


def _with_mode(spec: ArtifactSpec, src: Source) -> Source:
    """Apply ``mode``: ``file`` writes one file, ``dir`` unpacks, ``any`` decides by the source."""
    unpacks = src.archive is not None and not src.archive.single
    if spec.mode == "dir" and not unpacks:
        raise ArtifactError(src.display, 'mode "dir" needs an archive (tar or zip) source')
    if spec.mode == "file":
        if unpacks:
            raise ArtifactError(src.display, 'mode "file" cannot unpack a tar or zip archive; '
                                             'use mode "dir" or archive=false')
        # Nomad's legacy image_source uses destination "local/": a directory for the file.
        as_dir = spec.destination.endswith("/") or src.target.is_dir()
        if not as_dir:
            return replace(src, is_dir=False)
    if not unpacks and not src.file_name:
        raise ArtifactError(src.display, 'the URL names no file; use mode "file" with a '
                                         "destination file name")
    return src
