"""Fetching a task's artifacts into its task dir: the one entry point faces call.

Each artifact is checked first (all of them, before any byte moves), then fetched
into a hidden work dir inside the task dir (or the shared cache when it has a
checksum), verified, unpacked, and moved into place by rename. Any failure removes
the work dir, so neither the task dir nor the cache ever holds half a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import tempfile
import threading
from pathlib import Path

from vmdriver.artifacts import beneath
from vmdriver.artifacts.archive import decompress, unpack
from vmdriver.artifacts.cache import ArtifactCache, Entry, cache_key
from vmdriver.artifacts.http import HttpSettings, download
from vmdriver.artifacts.limits import ArtifactLimits
from vmdriver.artifacts.place import place_file
from vmdriver.artifacts.progress import Phase, ProgressCallback, ProgressEvent
from vmdriver.artifacts.source import ArtifactRefused, Source, open_local, parse_source
from vmdriver.artifacts.transfer import Cancelled, DiskFull, Sink, TooLarge, copy_stream
from vmdriver.errors import ArtifactError
from vmdriver.host.config import HostConfig
from vmdriver.spec import ArtifactSpec


class _Job:
    """One artifact being fetched: its source and how to report on it."""

    def __init__(self, src: Source, progress: ProgressCallback | None,
                 cancel: threading.Event | None, http: HttpSettings | None,
                 limits: ArtifactLimits) -> None:
        self.src = src
        self.progress = progress
        self.cancel = cancel
        self.http = http
        self.limits = limits

    def sink(self, path: Path) -> Sink:
        """Where the artifact's bytes go, at most ``artifact_max_size`` of them."""
        return Sink(path, self.src.checksum, limit=self.limits.max_size)

    def emit(self, phase: Phase, done: int = 0, total: int | None = None, *,
             finished: bool = False, message: str = "") -> None:
        if self.progress:
            self.progress(ProgressEvent(self.src.display, phase, done, total, finished, message))

    def counter(self, phase: Phase, total: int | None) -> functools.partial[None]:
        """A per-chunk callback that reports a running total."""
        seen = [0]

        def step(n: int) -> None:
            seen[0] += n
            self.emit(phase, seen[0], total)

        return functools.partial(step)

    def obtain(self, sink: Sink) -> None:
        """Fill ``sink`` from the source (download or local copy) and verify it."""
        src = self.src
        if src.kind == "http":
            download(src.location, src.headers, sink, src.display, settings=self.http,
                     progress=lambda done, total: self.emit("download", done, total),
                     cancel=self.cancel)
            self.emit("download", sink.size, sink.size, finished=True)
        else:
            with os.fdopen(open_local(src), "rb") as f:
                total = os.fstat(f.fileno()).st_size
                copy_stream(f, sink, cancel=self.cancel, progress=self.counter("copy", total))
            self.emit("copy", sink.size, total, finished=True)
        sink.close()
        if src.checksum and sink.hexdigest() != src.checksum.hexdigest:
            raise ArtifactError(src.display, f"checksum mismatch: expected {src.checksum}, got "
                                             f"{src.checksum.algorithm}:{sink.hexdigest()}")

    def fill(self, tmp: Path) -> dict[str, object]:
        """Fill a new cache entry: the verified blob, and its decompressed form."""
        sink = self.sink(tmp / "blob")
        try:
            self.obtain(sink)
        finally:
            sink.abort()
        archive = self.src.archive
        if archive is not None and archive.single:
            self.decompress(tmp / "blob", tmp / "data")
        return {"source": self.src.display, "size": sink.size, "name": self.src.file_name}

    def decompress(self, blob: Path, out: Path) -> None:
        assert self.src.archive is not None
        total = blob.stat().st_size
        decompress(blob, out, self.src.archive, self.src.display,
                   progress=self.counter("unpack", total), cancel=self.cancel, limits=self.limits)
        self.emit("unpack", total, total, finished=True)

    def materialize(self, blob: Path, data: Path | None, work: Path,
                    entry: tuple[ArtifactCache, Entry] | None, task_dir: Path) -> list[Path]:
        """Put the verified ``blob`` (or its ``data``) where the artifact says.

        The destination is walked from the task dir now, as it is written,
        following no symlink (an earlier artifact may have planted one).
        """
        src = self.src
        root = task_dir.resolve()
        if src.archive is not None and not src.archive.single:
            stage = work / "tree"
            stage.mkdir()
            total = blob.stat().st_size
            unpack(blob, stage, src.archive, src.display, progress=self.counter("unpack", total),
                   cancel=self.cancel, limits=self.limits)
            self.emit("unpack", total, total, finished=True)
            names = sorted(p.name for p in stage.iterdir())
            parts = beneath.components(str(src.target.relative_to(root)), src.display)
            with beneath.root_fd(str(root)) as rfd, beneath.open_dir(rfd, parts, src.display) \
                    as dst, beneath.root_fd(str(stage)) as sfd:
                beneath.move_into(sfd, dst)
            return [src.target / n for n in names]
        dest = src.target / src.file_name if src.is_dir else src.target
        parts = beneath.components(str(dest.parent.relative_to(root)), src.display)
        with beneath.root_fd(str(root)) as rfd, beneath.open_dir(rfd, parts, src.display) as dfd:
            # No link on the way now; none may sit where the file or its temporary goes.
            for name in (dest.name, f".{dest.name}.vmdriver-part"):
                if os.path.islink(dest.parent / name):
                    beneath.clear(dfd, name)
        if dest.is_dir():
            raise ArtifactError(src.display, f"destination {dest} is a directory")
        file = blob
        if src.archive is not None:  # single compressed file
            if data is None:
                data = work / "data"
                self.decompress(blob, data)
            file = data
        if work in file.parents:
            file.replace(dest)  # our own temporary file: just move it
            return [dest]
        pin = (lambda p: entry[0].pin(entry[1], p)) if entry else None
        how = place_file(file, dest, src.display, cow=entry is not None, pin=pin)
        if entry:
            self.emit("done", message=f"{'overlay on' if how == 'overlay' else 'copied from'} "
                                      f"the cached copy → {dest.name}")
        return [dest]

    def local(self, work: Path, task_dir: Path) -> list[Path]:
        """A ``file`` source without a checksum: placed from the file opened once, after its check."""
        src = self.src
        fd = open_local(src)
        try:
            if os.fstat(fd).st_size > self.limits.max_size:
                raise ArtifactRefused(src.display, f"too large: more than {self.limits.max_size} "
                                                   "bytes (the host's artifact limits)")
            # The open file itself, by a name any process of ours can open (cp, qemu-img).
            return self.materialize(Path(f"/proc/{os.getpid()}/fd/{fd}"), None, work, None,
                                    task_dir)
        finally:
            os.close(fd)

    def run(self, task_dir: Path, cache: ArtifactCache | None) -> list[Path]:
        src = self.src
        work = Path(tempfile.mkdtemp(prefix=".vmdriver-fetch-", dir=task_dir))
        try:
            if src.checksum and cache:
                filled = []

                def fill(tmp: Path) -> dict[str, object]:
                    filled.append(True)
                    return self.fill(tmp)

                with cache.use(cache_key(src.checksum, src.location), fill) as entry:
                    if not filled:
                        self.emit("cached", message=f"in the cache ({src.checksum.algorithm} "
                                                    "matches); nothing downloaded")
                    return self.materialize(entry.blob, entry.data, work, (cache, entry),
                                            task_dir)
            if src.kind == "file" and not src.checksum:
                return self.local(work, task_dir)
            sink = self.sink(work / "blob")
            try:
                self.obtain(sink)
            finally:
                sink.abort()
            return self.materialize(work / "blob", None, work, None, task_dir)
        except Cancelled:
            raise ArtifactError(src.display, "cancelled") from None
        except TooLarge as exc:
            raise ArtifactRefused(src.display, f"too large: {exc.what} (the host's artifact "
                                               "limits)") from None
        except DiskFull as exc:
            raise ArtifactError(src.display, str(exc.strerror)) from None
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            raise ArtifactError(src.display, f"{exc.strerror or exc}{where}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)


def fetch_artifacts(artifacts: tuple[ArtifactSpec, ...], task_dir: Path, job_dir: Path, *,
                    cache: ArtifactCache | None = None, progress: ProgressCallback | None = None,
                    cancel: threading.Event | None = None,
                    http: HttpSettings | None = None, host: HostConfig | None = None) -> list[Path]:
    """Fetch each artifact into ``task_dir``; return the paths placed (files or top entries).

    ``job_dir`` anchors relative sources. With a ``cache``, artifacts that carry a
    checksum are fetched once per host and shared. ``progress`` may be called from
    this thread at any time; setting ``cancel`` stops the fetch at the next chunk.
    Raises :class:`~vmdriver.errors.ArtifactError` naming the artifact and the cause.
    ``host`` gives the operator's ``image_paths`` (where local sources may lie besides
    ``job_dir``), ``artifact_getters`` and the size limits; defaults without it.
    """
    host = host or HostConfig()
    limits = ArtifactLimits.from_host(host)
    task_dir.mkdir(parents=True, exist_ok=True)
    sources = [parse_source(spec, task_dir, job_dir, image_paths=tuple(map(Path, host.image_paths)),
                            getters=host.artifact_getters) for spec in artifacts]
    placed: list[Path] = []
    for src in sources:
        placed += _Job(src, progress, cancel, http, limits).run(task_dir, cache)
    return placed


async def fetch_artifacts_async(artifacts: tuple[ArtifactSpec, ...], task_dir: Path,
                                job_dir: Path, *, cache: ArtifactCache | None = None,
                                progress: ProgressCallback | None = None,
                                http: HttpSettings | None = None,
                                host: HostConfig | None = None) -> list[Path]:
    """:func:`fetch_artifacts` in a worker thread; cancelling this stops the worker too."""
    cancel = threading.Event()
    call = functools.partial(fetch_artifacts, artifacts, task_dir, job_dir, cache=cache,
                             progress=progress, cancel=cancel, http=http, host=host)
    fut = asyncio.get_running_loop().run_in_executor(None, call)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        cancel.set()
        # Wait for the worker to clean up its temporary files; its "cancelled" error is
        # expected, a second cancellation of this wait still propagates.
        with contextlib.suppress(Exception):
            await fut
        raise


__all__ = ["fetch_artifacts", "fetch_artifacts_async"]
