"""Artifacts: files a task needs before its VM starts (Nomad's ``artifact`` block)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class ArtifactSpec(BaseModel):
    """One ``artifact { ... }`` block, as the job wrote it (not yet interpolated)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: http(s) URL, file URL, or a path relative to the job file.
    source: str
    #: Where it lands, relative to the task dir (always inside it).
    destination: str = "local/"
    #: ``any`` guesses from the source, ``file`` keeps one file, ``dir`` unpacks into a dir.
    mode: Literal["any", "file", "dir"] = "any"
    #: go-getter options, e.g. ``checksum = "sha256:..."``, ``archive = "false"``.
    options: tuple[tuple[str, str], ...] = ()
    #: Extra HTTP request headers.
    headers: tuple[tuple[str, str], ...] = ()
