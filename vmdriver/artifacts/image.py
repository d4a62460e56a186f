"""Disk image facts for placing artifacts: :mod:`vmdriver.qemu.image`, called with a path.

``qemu-img info`` reads the header only; it does not open backing files. Whether
the files an image names (backing, data file, extents) are allowed is decided
before launch by :mod:`vmdriver.policy.images`.
"""

from __future__ import annotations

from pathlib import Path

from vmdriver.qemu import image as qimage
from vmdriver.qemu.image import ImageInfo

__all__ = ["ImageInfo", "image_info"]


def image_info(path: Path, *, fmt: str | None = None, where: str = "") -> ImageInfo:
    """``qemu-img info`` of ``path`` (``-f fmt`` when the format is known), parsed."""
    return qimage.image_info(str(path), fmt=fmt, where=where)
