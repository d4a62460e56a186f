"""What is inside an image: its format, and every other file it would make QEMU open.

A qcow2 image may name a *backing file* or an *external data file*, a vmdk
descriptor names *extent* files: QEMU opens those by path, so an image the job
supplies could otherwise point at ``/etc/shadow`` and hand it to the guest (the
hole ``image_paths`` alone leaves open). ``qemu-img info`` reads the header
without opening backing files; every file it names must pass the path policy,
and backing files are inspected in turn.
"""

from __future__ import annotations

from pathlib import Path

from vmdriver.errors import PolicyError
from vmdriver.policy.paths import (
    OpenedImage,
    PathPolicy,
    check_regular_file,
    local_path,
    open_image,
    resolve_allowed,
)
from vmdriver.qemu.image import IMAGE_FORMATS, ImageInfo, backing_chain, image_info, qemu_img_info

#: Formats QEMU may be told an image has; anything else is refused.
KNOWN_FORMATS = IMAGE_FORMATS
#: Longest backing chain allowed.
MAX_CHAIN = 8

__all__ = ["KNOWN_FORMATS", "MAX_CHAIN", "checked_image", "inspect_image", "qemu_img_info"]


def inspect_image(name: str, policy: PathPolicy, *, fmt: str | None, where: str, value: str,
                  pass_fds: tuple[int, ...] = (), base_dir: Path | None = None) -> str:
    """Return the image's format after checking every file it names, down its backing chain.

    ``name`` is what qemu-img opens; ``base_dir`` is the directory relative
    backing names are taken from (``None`` when QEMU gets the image as an fd,
    where a relative backing name could not be found, so it is refused). Each
    backing file passes the path policy before it is opened.
    """
    top = image_info(name, fmt=fmt, where=where, value=value, pass_fds=pass_fds)
    _self_contained(top, where=where, value=value)
    backing_policy = policy.for_backing()

    def approve(image: ImageInfo, depth: int) -> str:
        shown = value if depth == 1 else image.filename
        if depth >= MAX_CHAIN:
            raise PolicyError("backing chain is too long", where=where, value=value,
                              allowed=f"at most {MAX_CHAIN} images")
        parent = base_dir if depth == 1 else Path(image.filename).parent
        return str(_backing_path(image, backing_policy, parent, where=where, value=shown))

    for below in backing_chain(top, approve, where=where)[1:]:
        _self_contained(below, where=where, value=below.filename)
    return top.format


def _self_contained(image: ImageInfo, *, where: str, value: str) -> None:
    """Refuse a data file or extent files: QEMU would open them by a name nobody checked."""
    if image.data_file:
        raise PolicyError("images with an external data file are not allowed", where=where,
                          value=value, allowed="self-contained images")
    if image.extents:
        raise PolicyError("vmdk images made of separate extent files are not allowed",
                          where=where, value=value,
                          allowed="single-file images (convert with qemu-img convert)")


def _backing_path(image: ImageInfo, policy: PathPolicy, base_dir: Path | None, *, where: str,
                  value: str) -> Path:
    """The resolved backing file of ``image``, if policy allows it."""
    backing = image.backing_filename or ""
    bwhere = f"{where} (backing file of {value})"
    path = local_path(backing, where=bwhere)
    if not Path(path).is_absolute():
        if base_dir is None:
            raise PolicyError("image has a relative backing file name", where=where,
                              value=backing, allowed="an absolute backing path, or a "
                              "flattened image (qemu-img convert)")
        path = str(base_dir / path)
    return resolve_allowed(path, policy, where=bwhere, what="backing file")


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
