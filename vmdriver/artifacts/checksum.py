"""Checksums in go-getter's ``type:hex`` form, and hashing while bytes stream past."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

#: Algorithms a checksum may name, by the hex length each produces.
ALGORITHMS = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
#: md5 and sha1 collide on purpose-built inputs: their cache keys also name the source.
WEAK = frozenset({"md5", "sha1"})
_HEX = re.compile(r"^[0-9a-f]+$")


class ChecksumSyntaxError(ValueError):
    """A checksum string is not ``type:hex`` (the message says why)."""


@dataclass(frozen=True)
class Checksum:
    """An expected digest."""

    algorithm: str
    hexdigest: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"

    @property
    def weak(self) -> bool:
        """md5 or sha1: good against corruption, not against an attacker."""
        return self.algorithm in WEAK

    def hasher(self) -> hashlib._Hash:
        """A fresh hash object of this algorithm."""
        return hashlib.new(self.algorithm)


def parse_checksum(text: str) -> Checksum:
    """``sha256:ab12...`` (or bare hex, its type guessed from its length, as go-getter does)."""
    raw = text.strip()
    algorithm, sep, digest = raw.partition(":")
    if not sep:
        algorithm, digest = "", raw
    algorithm, digest = algorithm.lower(), digest.strip().lower()
    if algorithm == "file":
        raise ChecksumSyntaxError("checksum files (file:URL) are not supported; "
                                  "give the digest itself")
    if not algorithm:
        guessed = [name for name, size in ALGORITHMS.items() if size == len(digest)]
        if not guessed:
            raise ChecksumSyntaxError(f"cannot tell the checksum type of a {len(digest)}-digit "
                                      "value; write it as type:hex")
        algorithm = guessed[0]
    if algorithm not in ALGORITHMS:
        raise ChecksumSyntaxError(f"unknown checksum type {algorithm!r} "
                                  f"(allowed: {', '.join(ALGORITHMS)})")
    if not _HEX.match(digest):
        raise ChecksumSyntaxError(f"{algorithm} checksum is not hexadecimal")
    if len(digest) != ALGORITHMS[algorithm]:
        raise ChecksumSyntaxError(f"{algorithm} checksum has {len(digest)} hex digits, "
                                  f"not {ALGORITHMS[algorithm]}")
    return Checksum(algorithm, digest)
