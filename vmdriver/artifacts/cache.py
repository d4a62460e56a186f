"""A content-addressed artifact cache shared by every task on the host.

Layout under the cache root::

    entries/<key>/blob          the verified download (read-only)
    entries/<key>/data          its decompressed form, for single compressed files
    entries/<key>/meta.json     written last: an entry without it does not exist
    entries/<key>/used          its mtime is the entry's last use (LRU order)
    entries/<key>/pins/<hash>   text: a task file (an overlay) that reads this entry
    locks/<key>.lock            fcntl.flock: exclusive to fill or evict, shared to use
    tmp/                        entries being filled or removed

The key is the checksum (``sha256-<hex>``); for md5 and sha1, whose collisions can be
built, the key also names the source URL so a crafted file from one server never
answers for another server's artifact. Entries appear by an atomic rename, so a
reader sees a whole entry or none. Locks are flock(2) locks: they work between
processes and vanish with a crashed process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vmdriver.artifacts.checksum import Checksum

log = logging.getLogger(__name__)

#: Cache size limit when the operator sets none.
DEFAULT_MAX_BYTES = 20 * 1024**3


def default_cache_dir(state_dir: Path) -> Path:
    """Where the cache lives for a host state dir."""
    return state_dir / "cache"


def cache_key(checksum: Checksum, source: str) -> str:
    """The entry name for an artifact with ``checksum`` fetched from ``source``."""
    key = f"{checksum.algorithm}-{checksum.hexdigest}"
    if checksum.weak:
        key += "-" + hashlib.sha256(source.encode()).hexdigest()[:16]
    return key


@dataclass(frozen=True)
class Entry:
    """A complete cache entry."""

    key: str
    path: Path

    @property
    def blob(self) -> Path:
        """The verified download."""
        return self.path / "blob"

    @property
    def data(self) -> Path | None:
        """The decompressed file, if the entry holds one."""
        p = self.path / "data"
        return p if p.exists() else None


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


class ArtifactCache:
    """The cache: fill an entry once, hand it out many times, evict the least used."""

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def _dirs(self) -> None:
        for d in (self.root, self.root / "entries", self.root / "locks", self.root / "tmp"):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    @contextlib.contextmanager
    def _lock(self, key: str, *, shared: bool, wait: bool = True) -> Iterator[bool]:
        """Hold the key's lock; yields False (without the lock) if ``wait`` is off and it is taken."""
        fd = os.open(self.root / "locks" / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing releases the lock

    def _entry(self, key: str) -> Entry | None:
        path = self.root / "entries" / key
        return Entry(key, path) if (path / "meta.json").exists() else None

    @contextlib.contextmanager
    def use(self, key: str, fill: Callable[[Path], dict[str, object]]) -> Iterator[Entry]:
        """The entry for ``key``, filled by ``fill(tmpdir)`` if missing, held while in use.

        ``fill`` writes ``blob`` (and maybe ``data``) into the directory it is given and
        returns metadata. Callers of the same key in other threads or processes wait for
        one fill and then share its result.
        """
        self._dirs()
        for _ in range(5):  # an eviction can slip between the fill and the use; rarely twice
            with self._lock(key, shared=True):
                entry = self._entry(key)
                if entry is not None:
                    (entry.path / "used").touch()
                    yield entry
                    return
            self._fill(key, fill)
        raise RuntimeError(f"cache entry {key} vanished after each of 5 fills")

    def lookup(self, key: str) -> Entry | None:
        """The entry if it is there (not locked: for reports and tests)."""
        return self._entry(key)

    def _fill(self, key: str, fill: Callable[[Path], dict[str, object]]) -> None:
        with self._lock(key, shared=False):
            if self._entry(key) is not None:
                return  # another fetcher filled it while we waited
            for stale in (self.root / "tmp").glob(f"{key}.*"):
                shutil.rmtree(stale, ignore_errors=True)  # a crashed fill of this key
            tmp = self.root / "tmp" / f"{key}.{uuid.uuid4().hex[:8]}"
            tmp.mkdir(mode=0o700)
            try:
                meta = fill(tmp)
                for name in ("blob", "data"):
                    if (tmp / name).exists():
                        (tmp / name).chmod(0o444)
                (tmp / "pins").mkdir()
                (tmp / "used").touch()
                meta = {**meta, "key": key, "created": time.time()}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
                tmp.rename(self.root / "entries" / key)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self.evict(keep=key)

    def pin(self, entry: Entry, user: Path) -> None:
        """Record that ``user`` (an overlay) reads ``entry``; eviction spares it while it exists."""
        text = str(user.absolute())
        name = hashlib.sha256(text.encode()).hexdigest()[:32]
        (entry.path / "pins" / name).write_text(text)

    def _pinned(self, path: Path) -> bool:
        live = False
        for pin in (path / "pins").glob("*"):
            with contextlib.suppress(OSError):
                if Path(pin.read_text()).exists():
                    live = True
                else:
                    pin.unlink()  # its task dir is gone
        return live

    def entries(self) -> list[tuple[str, float, int]]:
        """(key, last use, bytes on disk) of each entry, least recently used first."""
        out = []
        for path in (self.root / "entries").glob("*"):
            with contextlib.suppress(OSError):
                out.append((path.name, (path / "used").stat().st_mtime, _du(path)))
        return sorted(out, key=lambda e: e[1])

    def evict(self, keep: str = "") -> list[str]:
        """Remove least recently used, unpinned, unlocked entries until under the limit."""
        entries = self.entries()
        total = sum(size for _, _, size in entries)
        removed = []
        for key, _, size in entries:
            if total <= self.max_bytes:
                break
            if key == keep:
                continue
            with self._lock(key, shared=False, wait=False) as got:
                path = self.root / "entries" / key
                if not got or self._pinned(path):
                    continue
                doomed = self.root / "tmp" / f"{key}.evict-{uuid.uuid4().hex[:8]}"
                path.rename(doomed)  # atomic: readers see the whole entry or none
                shutil.rmtree(doomed, ignore_errors=True)
            total -= size
            removed.append(key)
            log.info("artifact cache: evicted %s (%d bytes)", key, size)
        if total > self.max_bytes:
            log.warning("artifact cache holds %d bytes, over its %d limit: the rest is in use",
                        total, self.max_bytes)
        return removed
