"""Disk image facts from ``qemu-img info``: what placing an artifact needs to know.

``qemu-img info`` reads the header only; it does not open backing files. Whether
the files an image names (backing, data file, extents) are allowed is decided
before launch by :mod:`vmdriver.policy.images`.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmdriver.errors import SpecError

#: Formats QEMU may be told an image has; anything else is refused.
KNOWN_FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vhdx", "vpc", "qed", "qcow", "dmg", "parallels")


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info`` says about one image (its backing file not opened)."""

    path: Path
    format: str
    virtual_size: int
    #: The backing file as QEMU will resolve it (relative names: next to the image).
    backing: str | None = None
    backing_format: str | None = None
    #: Other host files the image makes QEMU open (qcow2 data-file, vmdk extents).
    extra_files: tuple[str, ...] = ()


def image_info(path: Path, *, fmt: str | None = None, where: str = "") -> ImageInfo:
    """Run ``qemu-img info --output=json`` (``-f fmt`` when the format is known)."""
    argv = ["qemu-img", "info", "--output=json"]
    if fmt:
        argv += ["-f", fmt]
    try:
        out = subprocess.run(
            (*argv, "--", str(path)), capture_output=True, text=True, timeout=30, check=False,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except FileNotFoundError:
        raise SpecError("qemu-img is not installed; it is needed to inspect images",
                        where=where) from None  # fmt: skip
    except subprocess.TimeoutExpired:
        raise SpecError("qemu-img info timed out", where=where, value=str(path)) from None
    if out.returncode != 0:
        msg = (out.stderr.strip().splitlines() or ["unreadable image"])[-1]
        raise SpecError(f"not a usable disk image: {msg}", where=where, value=str(path))
    data: dict[str, Any] = json.loads(out.stdout)
    found = str(data.get("format", ""))
    if found not in KNOWN_FORMATS:
        raise SpecError("unsupported image format", where=where, value=found,
                        allowed=KNOWN_FORMATS)  # fmt: skip
    backing = data.get("full-backing-filename") or data.get("backing-filename")
    return ImageInfo(
        path=path, format=found, virtual_size=int(data.get("virtual-size", 0)),
        backing=str(backing) if backing else None,
        backing_format=data.get("backing-filename-format"),
        extra_files=_extra_files(data.get("format-specific") or {}),
    )  # fmt: skip


def _extra_files(spec: dict[str, Any]) -> tuple[str, ...]:
    detail = spec.get("data") or {}
    files = []
    if detail.get("data-file"):
        files.append(str(detail["data-file"]))
    for extent in detail.get("extents") or ():
        if isinstance(extent, dict) and extent.get("filename"):
            files.append(str(extent["filename"]))
    return tuple(files)
