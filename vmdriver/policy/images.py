"""What is inside an image: its format, and every other file it would make QEMU open.

A qcow2 image may name a *backing file* or an *external data file*, a vmdk
descriptor names *extent* files: QEMU opens those by path, so an image the job
supplies could otherwise point at ``/etc/shadow`` and hand it to the guest (the
hole ``image_paths`` alone leaves open). ``qemu-img info`` reads the header
without opening backing files; every file it names must pass the path policy,
and backing files are inspected in turn.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from vmdriver.errors import PolicyError, SpecError
from vmdriver.policy.paths import (
    OpenedImage,
    PathPolicy,
    check_regular_file,
    local_path,
    open_image,
    resolve_allowed,
)

#: Formats QEMU may be told an image has; anything else is refused.
KNOWN_FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vhdx", "vpc", "qed", "qcow", "dmg", "parallels")
#: Longest backing chain followed.
MAX_CHAIN = 8


def qemu_img_info(name: str, *, fmt: str | None, where: str, value: str,
                  pass_fds: tuple[int, ...] = ()) -> dict[str, Any]:
    """``qemu-img info --output=json`` of ``name`` (a path, or ``/dev/fd/N`` with ``pass_fds``)."""
    cmd = ["qemu-img", "info", "--output=json"]
    if fmt:
        cmd += ["-f", fmt]
    try:
        out = subprocess.run(
            (*cmd, "--", name), capture_output=True, text=True, timeout=30, check=False,
            stdin=subprocess.DEVNULL, pass_fds=pass_fds,
        )
    except FileNotFoundError:
        raise SpecError("qemu-img is not installed; it is needed to inspect images",
                        where=where) from None
    except subprocess.TimeoutExpired:
        raise SpecError("qemu-img info timed out", where=where, value=value) from None
    if out.returncode != 0:
        msg = (out.stderr.strip().splitlines() or ["unreadable image"])[-1]
        raise SpecError(f"not a usable disk image: {msg[:200]}", where=where, value=value)
    try:
        info = json.loads(out.stdout)
    except ValueError:
        raise SpecError("qemu-img info gave no JSON", where=where, value=value) from None
    if not isinstance(info, dict):
        raise SpecError("qemu-img info gave no JSON object", where=where, value=value)
    return info


def inspect_image(name: str, policy: PathPolicy, *, fmt: str | None, where: str, value: str,
                  pass_fds: tuple[int, ...] = (), base_dir: Path | None = None,
                  depth: int = 0) -> str:
    """Return the image's format after checking every file it names.

    ``name`` is what qemu-img opens; ``base_dir`` is the directory relative
    backing names are taken from (``None`` when QEMU gets the image as an fd,
    where a relative backing name could not be found, so it is refused).
    """
    if fmt is not None and fmt not in KNOWN_FORMATS:
        raise SpecError("unsupported image format", where=where, value=fmt, allowed=KNOWN_FORMATS)
    info = qemu_img_info(name, fmt=fmt, where=where, value=value, pass_fds=pass_fds)
    found = str(info.get("format", ""))
    if found not in KNOWN_FORMATS:
        raise SpecError("unsupported image format", where=where, value=found,
                        allowed=KNOWN_FORMATS)
    data = (info.get("format-specific") or {}).get("data") or {}
    if isinstance(data, dict) and data.get("data-file"):
        raise PolicyError("images with an external data file are not allowed", where=where,
                          value=value, allowed="self-contained images")
    for extent in (data.get("extents") or []) if isinstance(data, dict) else []:
        if isinstance(extent, dict) and extent.get("filename") not in (None, name):
            raise PolicyError("vmdk images made of separate extent files are not allowed",
                              where=where, value=value,
                              allowed="single-file images (convert with qemu-img convert)")
    backing = info.get("backing-filename")
    if backing:
        _check_backing(str(backing), info, policy, where=where, value=value,
                       base_dir=base_dir, depth=depth)
    return found


def _check_backing(backing: str, info: dict[str, Any], policy: PathPolicy, *, where: str,
                   value: str, base_dir: Path | None, depth: int) -> None:
    bwhere = f"{where} (backing file of {value})"
    if depth + 1 >= MAX_CHAIN:
        raise PolicyError("backing chain is too long", where=where, value=value,
                          allowed=f"at most {MAX_CHAIN} images")
    path = local_path(backing, where=bwhere)
    if not Path(path).is_absolute():
        if base_dir is None:
            raise PolicyError("image has a relative backing file name", where=where,
                              value=backing, allowed="an absolute backing path, or a "
                              "flattened image (qemu-img convert)")
        path = str(base_dir / path)
    policy = policy.for_backing()
    resolved = resolve_allowed(path, policy, where=bwhere, what="backing file")
    bfmt = info.get("backing-filename-format")
    inspect_image(str(resolved), policy, fmt=str(bfmt) if bfmt else None, where=where,
                  value=str(resolved), base_dir=resolved.parent, depth=depth + 1)


def checked_image(image: str, policy: PathPolicy, *, fmt: str | None, writable: bool,
                  where: str) -> tuple[OpenedImage, str]:
    """Resolve, check, open and inspect a drive's image; return the open image and its format.

    The caller owns the returned fds (hand them to QEMU, then close them).
    """
    resolved = check_regular_file(resolve_allowed(image, policy, where=where, what="image path"),
                                  where=where, value=image)
    opened = open_image(resolved, policy, writable=writable, where=where, value=image)
    try:
        found = inspect_image(f"/dev/fd/{opened.ro_fd}", policy, fmt=fmt, where=where,
                              value=image, pass_fds=(opened.ro_fd,))
    except BaseException:
        opened.close()
        raise
    return opened, found
