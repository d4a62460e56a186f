"""Disk image facts from ``qemu-img info``: what placing an artifact needs to know.

``qemu-img info`` reads the header only; it does not open backing files. Whether
the files an image names (backing, data file, extents) are allowed is decided
before launch by :mod:`vmdriver.policy.images`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmdriver.errors import SpecError
from vmdriver.policy.images import KNOWN_FORMATS, qemu_img_info


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
    """``qemu-img info`` of ``path`` (``-f fmt`` when the format is known), parsed."""
    data = qemu_img_info(str(path), fmt=fmt, where=where, value=str(path))
    found = str(data.get("format", ""))
    if found not in KNOWN_FORMATS:
        raise SpecError("unsupported image format", where=where, value=found,
                        allowed=KNOWN_FORMATS)
    backing = data.get("full-backing-filename") or data.get("backing-filename")
    return ImageInfo(
        path=path, format=found, virtual_size=int(data.get("virtual-size", 0)),
        backing=str(backing) if backing else None,
        backing_format=data.get("backing-filename-format"),
        extra_files=_extra_files(data.get("format-specific") or {}),
    )


def _extra_files(spec: dict[str, Any]) -> tuple[str, ...]:
    detail = spec.get("data") or {}
    files = []
    if detail.get("data-file"):
        files.append(str(detail["data-file"]))
    for extent in detail.get("extents") or ():
        if isinstance(extent, dict) and extent.get("filename"):
            files.append(str(extent["filename"]))
    return tuple(files)
