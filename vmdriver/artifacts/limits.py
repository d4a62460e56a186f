"""How much one artifact may make the host download and write (the operator's bounds).

A download stops at ``artifact_max_size``. Unpacking or decompressing stops at
``artifact_max_unpacked`` bytes written, at ``artifact_max_ratio`` bytes written
per byte of archive (a zip bomb is refused long before the disk fills), and at
``artifact_max_entries`` entries.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmdriver.artifacts.transfer import TooLarge
from vmdriver.host.config import HostConfig

#: The ratio applies to archives of at least this size (a tiny file may compress a lot).
RATIO_FLOOR = 1 << 20


@dataclass(frozen=True)
class ArtifactLimits:
    """The bounds, in bytes and counts."""

    max_size: int = 50 << 30
    max_unpacked: int = 100 << 30
    max_ratio: int = 1000
    max_entries: int = 10000

    @classmethod
    def from_host(cls, host: HostConfig) -> ArtifactLimits:
        """The host config's ``artifact_max_*`` fields."""
        return cls(max_size=host.bytes_of("artifact_max_size") or cls.max_size,
                   max_unpacked=host.bytes_of("artifact_max_unpacked") or cls.max_unpacked,
                   max_ratio=host.artifact_max_ratio, max_entries=host.artifact_max_entries)


class Budget:
    """What unpacking one archive has written so far; raises :class:`TooLarge` past a bound."""

    def __init__(self, limits: ArtifactLimits, archive_size: int) -> None:
        self.limits = limits
        self.cap = min(limits.max_unpacked,
                       limits.max_ratio * max(archive_size, RATIO_FLOOR))
        self.written = 0
        self.entries = 0

    def entry(self) -> None:
        """Count one archive entry."""
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise TooLarge(f"more than {self.limits.max_entries} entries (artifact_max_entries)")

    def add(self, n: int) -> None:
        """Count ``n`` bytes written."""
        self.written += n
        if self.written > self.cap:
            why = ("artifact_max_unpacked" if self.cap == self.limits.max_unpacked
                   else f"artifact_max_ratio {self.limits.max_ratio}:1")
            raise TooLarge(f"unpacks to more than {self.cap} bytes ({why})")
