"""Writing fetched bytes: hashed as they pass, holes kept, cancellable, disk-full reported."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from vmdriver.artifacts.checksum import Checksum

#: Read and write in pieces this big (also the unit of hole detection).
CHUNK = 1 << 20
#: Zero runs this long, aligned, become holes (the usual filesystem extent granularity).
HOLE = 64 << 10
_ZEROS = bytes(HOLE)
#: Called with the number of bytes just handled.
ProgressFn = Callable[[int], None]


class Cancelled(Exception):
    """The caller asked the fetch to stop."""


class DiskFull(OSError):
    """No space was left for the bytes being written."""


class TooLarge(Exception):
    """More bytes than the operator allows one artifact (``artifact_max_size`` and friends)."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(what)


def check_cancel(cancel: threading.Event | None) -> None:
    """Raise :class:`Cancelled` if ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled


class Sink:
    """A file being filled from a stream: hashes what it is given, leaves zero runs as holes.

    Raw disk images are mostly zeros; writing aligned zero runs as holes keeps the cache
    and the task's sparse copy small. ``reset`` starts over (a server that ignored a Range).
    """

    def __init__(self, path: Path, checksum: Checksum | None, *, fd: int | None = None,
                 limit: int | None = None) -> None:
        self.path = path
        self.checksum = checksum
        self.size = 0
        #: Most bytes this sink takes (:class:`TooLarge` past it).
        self.limit = limit
        # ``fd``: a file opened by a confined walk (artifacts.beneath), never by path.
        self._file: BinaryIO = (os.fdopen(fd, "wb") if fd is not None
                                else open(path, "wb"))  # noqa: SIM115 - closed in close()
        self._hash: hashlib._Hash | None = checksum.hasher() if checksum else None

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``."""
        view = memoryview(data)
        if self.limit is not None and self.size + len(view) > self.limit:
            raise TooLarge(f"more than {self.limit} bytes")
        if self._hash is not None:
            self._hash.update(view)
        off = 0
        while off < len(view):
            # Pieces end on file offsets that are multiples of HOLE, so zero runs are
            # found however the stream happens to be chunked.
            end = min(len(view), off + HOLE - (self.size + off) % HOLE)
            piece = view[off:end]
            try:
                if piece == _ZEROS[:len(piece)]:
                    self._file.seek(len(piece), os.SEEK_CUR)
                else:
                    self._file.write(piece)
            except OSError as exc:
                raise _disk_error(exc, self.path) from None
            off = end
        self.size += len(view)

    def reset(self) -> None:
        """Forget everything written so far."""
        self._file.seek(0)
        self._file.truncate()
        self.size = 0
        self._hash = self.checksum.hasher() if self.checksum else None

    def hexdigest(self) -> str:
        """Digest of the bytes written (the checksum's algorithm)."""
        assert self._hash is not None
        return self._hash.hexdigest()

    def close(self) -> None:
        """Fix the length (trailing holes have no bytes yet) and flush to disk."""
        try:
            if not self._file.closed:
                self._file.truncate(self.size)
                self._file.flush()
                os.fsync(self._file.fileno())
        except OSError as exc:
            raise _disk_error(exc, self.path) from None
        finally:
            self._file.close()

    def abort(self) -> None:
        """Close without caring about errors (the file is about to be removed)."""
        with contextlib.suppress(OSError):
            self._file.close()


def _disk_error(exc: OSError, path: Path) -> OSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(exc.errno, f"no space left on the disk holding {path.parent}")
    return exc


def copy_stream(src: BinaryIO, sink: Sink, *, cancel: threading.Event | None = None,
                progress: ProgressFn | None = None) -> None:
    """Copy ``src`` to ``sink`` in chunks."""
    while True:
        check_cancel(cancel)
        data = src.read(CHUNK)
        if not data:
            return
        sink.write(data)
        if progress:
            progress(len(data))


class CountingReader:
    """A read-only file wrapper that reports how many bytes were read (unpack progress)."""

    def __init__(self, raw: BinaryIO, progress: ProgressFn | None,
                 cancel: threading.Event | None) -> None:
        self._raw = raw
        self._progress = progress
        self._cancel = cancel

    def read(self, size: int = -1) -> bytes:
        """Read like the wrapped file, then report."""
        check_cancel(self._cancel)
        data = self._raw.read(size)
        if self._progress and data:
            self._progress(len(data))
        return data

    def readable(self) -> bool:
        """Always true."""
        return True
