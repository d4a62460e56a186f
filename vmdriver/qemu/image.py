"""What ``qemu-img info --output=json`` says about a disk image: the one reader of it.

``qemu-img info`` reads the image's header only; it does not open backing files
(``BDRV_O_NO_BACKING``), so asking is safe whatever the image names. The files
an image makes QEMU open are all in :class:`ImageInfo`: the backing file (as
recorded, and as QEMU resolves it), a qcow2 external data file, vmdk extents.
Following a backing chain is :func:`backing_chain`, which lets the caller
approve each backing file *before* it is opened.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmdriver.errors import SpecError

#: Disk image formats (block drivers that read a file's contents); protocols
#: and special drivers (``file``, ``nbd``, ``vvfat``, ``luks`` ...) are not here.
IMAGE_FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vhdx", "vpc", "qed", "qcow", "dmg",
                 "parallels")
#: Formats whose images may have a backing file (a chain of layers).
LAYERED_FORMATS = frozenset({"qcow2", "qed", "qcow", "vmdk"})
#: Longest backing chain :func:`backing_chain` follows.
MAX_CHAIN = 8
#: Bound on one ``qemu-img info`` run (it reads one header).
TIMEOUT_S = 30


@dataclass(frozen=True)
class ImageInfo:
    """One image's facts (its backing file not opened)."""

    #: The name qemu-img was given (a path, or ``/dev/fd/N``).
    filename: str
    format: str
    virtual_size: int
    #: Bytes the file occupies on disk.
    actual_size: int = 0
    #: The backing file name as recorded in the image (may be relative, or a protocol).
    backing_filename: str | None = None
    #: The backing file as QEMU resolves it (relative names: next to the image).
    backing: str | None = None
    backing_format: str | None = None
    #: A qcow2 external data file.
    data_file: str | None = None
    #: vmdk extent files other than the image itself.
    extents: tuple[str, ...] = ()

    @property
    def extra_files(self) -> tuple[str, ...]:
        """Files other than the image and its backing file that QEMU would open."""
        return ((self.data_file,) if self.data_file else ()) + self.extents

    @classmethod
    def from_json(cls, data: dict[str, Any], filename: str) -> ImageInfo:
        """From ``qemu-img info --output=json``'s object."""
        detail = (data.get("format-specific") or {}).get("data") or {}
        if not isinstance(detail, dict):
            detail = {}
        extents = tuple(str(e["filename"]) for e in detail.get("extents") or ()
                        if isinstance(e, dict) and e.get("filename") not in (None, filename))
        recorded = data.get("backing-filename")
        full = data.get("full-backing-filename") or recorded
        bfmt = data.get("backing-filename-format")
        return cls(
            filename=filename, format=str(data.get("format", "")),
            virtual_size=int(data.get("virtual-size", 0)),
            actual_size=int(data.get("actual-size", 0)),
            backing_filename=str(recorded) if recorded else None,
            backing=str(full) if full else None,
            backing_format=str(bfmt) if bfmt else None,
            data_file=str(detail["data-file"]) if detail.get("data-file") else None,
            extents=extents,
        )


def qemu_img_info(name: str, *, fmt: str | None, where: str, value: str,
                  pass_fds: tuple[int, ...] = ()) -> dict[str, Any]:
    """``qemu-img info --output=json`` of ``name`` (a path, or ``/dev/fd/N`` with ``pass_fds``).

    ``-f fmt`` when the format is known, so a raw image is never probed.
    Errors name ``where`` and ``value`` (how the user wrote the image).
    """
    # -U: read the header without taking QEMU's image locks. The image of a VM that is being
    # live-migrated here is still locked by the source QEMU; QEMU's own locks still guard
    # writers when it opens (or activates) the image.
    cmd = ["qemu-img", "info", "-U", "--output=json"]
    if fmt:
        cmd += ["-f", fmt]
    try:
        out = subprocess.run(
            (*cmd, "--", name), capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
            stdin=subprocess.DEVNULL, pass_fds=pass_fds,
        )
    except FileNotFoundError:
        raise SpecError("qemu-img is not installed; it is needed to inspect images",
                        where=where) from None
    except subprocess.TimeoutExpired:
        raise SpecError("qemu-img info timed out", where=where, value=value) from None
    if out.returncode != 0:
        msg = (out.stderr.strip().splitlines() or ["unreadable image"])[-1]
        # qemu-img names the path (long) first and the reason last: keep both ends.
        short = msg if len(msg) <= 200 else f"{msg[:100]}…{msg[-90:]}"
        raise SpecError(f"not a usable disk image: {short}", where=where, value=value)
    try:
        info = json.loads(out.stdout)
    except ValueError:
        raise SpecError("qemu-img info gave no JSON", where=where, value=value) from None
    if not isinstance(info, dict):
        raise SpecError("qemu-img info gave no JSON object", where=where, value=value)
    return info


def image_info(name: str, *, fmt: str | None = None, where: str = "", value: str | None = None,
               pass_fds: tuple[int, ...] = ()) -> ImageInfo:
    """:func:`qemu_img_info`, read into an :class:`ImageInfo`; refuses non-image formats."""
    shown = name if value is None else value
    if fmt is not None and fmt not in IMAGE_FORMATS:
        raise SpecError("unsupported image format", where=where, value=fmt,
                        allowed=IMAGE_FORMATS)
    info = ImageInfo.from_json(qemu_img_info(name, fmt=fmt, where=where, value=shown,
                                             pass_fds=pass_fds), name)
    if info.format not in IMAGE_FORMATS:
        raise SpecError("unsupported image format", where=where, value=info.format,
                        allowed=IMAGE_FORMATS)
    return info


#: Called with an image whose backing file is about to be opened and the chain
#: depth; returns the name to open it by (or raises to refuse it).
Approve = Callable[[ImageInfo, int], str]


def backing_chain(top: ImageInfo, approve: Approve, *, where: str = "") -> tuple[ImageInfo, ...]:
    """``top`` and every image below it, each backing file approved before it is opened.

    The backing format recorded in each image is used (``-f``), so no layer is probed.
    """
    chain = [top]
    while chain[-1].backing_filename:
        if len(chain) >= MAX_CHAIN:
            raise SpecError("backing chain is too long", where=where, value=top.filename,
                            allowed=f"at most {MAX_CHAIN} images")
        below = chain[-1]
        name = approve(below, len(chain))
        chain.append(image_info(name, fmt=below.backing_format, where=where, value=name))
    return tuple(chain)
