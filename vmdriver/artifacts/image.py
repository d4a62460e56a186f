"""Disk image facts from ``qemu-img info``, and the files an image makes QEMU open.

A qcow2 image can name a backing file, a qcow2 external data file, and a vmdk
descriptor names extent files: QEMU opens each of them on the host. A downloaded
image, or a raw disk a guest rewrote with a qcow2 header, could point them at
host files, so every such file must lie in the task dir, the artifact cache or an
operator's ``image_paths``, and every backing file must have its format recorded
(else QEMU would probe it, with the same risk one level down).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmdriver.errors import PolicyError, SpecError

#: Formats QEMU may be told an image has; anything else is refused.
KNOWN_FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vhdx", "vpc", "qed", "qcow", "dmg", "parallels")
#: Backing chains longer than this are refused (a loop would never end).
MAX_CHAIN = 16


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


def detect_format(path: Path, *, where: str) -> str:
    """The image's format as ``qemu-img info`` reads it."""
    return image_info(path, where=where).format


def _is_under(path: Path, bases: Sequence[Path]) -> bool:
    return any(path == b or b in path.parents for b in bases)


def _host_file(name: str, image: Path, allowed: Sequence[Path], what: str, where: str) -> Path:
    """Resolve a file an image names and insist it lies in an allowed place."""
    head = name.split("/", 1)[0]
    if name.startswith("json:") or ":" in head:
        raise PolicyError(f"image {what} names a protocol, not a file", where=where, value=name)
    candidate = Path(name) if Path(name).is_absolute() else image.parent / name
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        raise SpecError(f"image {what} does not exist", where=where, value=name) from None
    if not _is_under(resolved, allowed):
        raise PolicyError(f"image {what} is outside the allowed paths", where=where, value=name,
                          allowed="the task dir, the artifact cache, image_paths")  # fmt: skip
    return resolved


def check_image_files(info: ImageInfo, allowed: Sequence[Path], *, where: str = "") -> None:
    """Follow the backing chain; refuse any file in it outside ``allowed`` (resolved dirs)."""
    bases = [Path(p).resolve() for p in allowed]
    seen = {info.path.resolve()}
    current = info
    for _ in range(MAX_CHAIN):
        for extra in current.extra_files:
            _host_file(extra, current.path, bases, "data or extent file", where)
        if current.backing is None:
            return
        backing = _host_file(current.backing, current.path, bases, "backing file", where)
        if not current.backing_format:
            raise PolicyError("image backing file has no recorded format (QEMU would have to "
                              "probe it); recreate the overlay with -F FORMAT", where=where,
                              value=current.backing)  # fmt: skip
        if backing in seen:
            raise SpecError("image backing chain loops", where=where, value=str(backing))
        seen.add(backing)
        current = image_info(backing, fmt=current.backing_format, where=where)
    raise SpecError(f"image backing chain is longer than {MAX_CHAIN}", where=where,
                    value=str(info.path))  # fmt: skip
