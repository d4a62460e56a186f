"""Write a NoCloud seed: ``meta-data``, ``user-data`` and ``network-config`` on a
small volume labelled ``cidata``, in-process.

- ISO 9660 (default) with Rock Ridge and Joliet names, via pycdlib: what
  cloud-localds and most clouds make; attach it as a CD-ROM.
- FAT (on request; VM-Operator's runner convention), via fatfs-ng, a binding of
  ChaN's FatFs: a mature FAT implementation with long file names. Its Python
  binding does not expose ``f_setlabel``, so the volume label is stamped into
  the boot sector and the root directory here (blkid reads the latter).

The seed is written to a temporary file next to ``dest`` and renamed into
place (mode 0600), so a reader never sees half a seed.
"""

from __future__ import annotations

import io
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Final

from vmdriver.cloudinit.mime import merge_user_data
from vmdriver.cloudinit.request import SeedRequest
from vmdriver.cloudinit.userdata import cloud_config_text, meta_data
from vmdriver.errors import SpecError

#: Volume label cloud-init's NoCloud looks for (it tries both cases).
ISO_LABEL: Final = "cidata"
FAT_LABEL: Final = "CIDATA"  # FAT labels are upper case by DOS convention
#: Seed file name → ISO 9660 level-1 name (Rock Ridge and Joliet carry the real one).
_ISO_NAMES: Final = {"meta-data": "METADATA.;1", "user-data": "USERDATA.;1",
                     "network-config": "NETWORK.;1", "vendor-data": "VENDORDA.;1"}
_FAT_MIN_BYTES: Final = 256 * 1024
_MAX_SEED_BYTES: Final = 16 * 1024 * 1024


class SeedFormat(StrEnum):
    """The seed volume's file system."""

    ISO = "iso"
    FAT = "fat"


def seed_files(req: SeedRequest) -> dict[str, bytes]:
    """The seed's files by name, as bytes (pure: no I/O)."""
    user = cloud_config_text(req)
    if req.user_data is not None:
        user = merge_user_data(user, req.user_data)
    files = {"meta-data": meta_data(req).encode(), "user-data": user.encode()}
    if req.network_config is not None:
        files["network-config"] = req.network_config.encode()
    if sum(len(b) for b in files.values()) > _MAX_SEED_BYTES:
        raise SpecError("the seed would exceed 16 MiB", where="user_data")
    return files


def seed_texts(req: SeedRequest) -> tuple[tuple[str, str], ...]:
    """The seed's files as ``(name, text)`` pairs, the shape of the core's ``spec.Seed.files``."""
    return tuple((name, data.decode()) for name, data in seed_files(req).items())


def build_seed(req: SeedRequest, dest: Path, fmt: SeedFormat | str = SeedFormat.ISO) -> Path:
    """Write the seed for ``req`` to ``dest`` atomically (mode 0600); return ``dest``.

    :raise SpecError: an unknown format, or a request too big for a seed.
    """
    try:
        kind = SeedFormat(fmt)
    except ValueError:
        raise SpecError("unknown seed format", where="seed format", value=fmt,
                        allowed=[f.value for f in SeedFormat]) from None
    files = seed_files(req)
    image = iso_image(files) if kind is SeedFormat.ISO else fat_image(files)
    write_atomically(dest, image)
    return dest


def write_atomically(dest: Path, data: bytes, mode: int = 0o600) -> None:
    """Temp file in ``dest``'s directory, then rename: readers see all or nothing.

    No fsync: a seed is rebuilt on every start, so a crash may lose it but never
    leaves a torn one under the final name.
    """
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def iso_image(files: Mapping[str, bytes], label: str = ISO_LABEL) -> bytes:
    """An ISO 9660 image labelled ``label`` holding ``files`` (plain names, at most 64 characters)."""
    import pycdlib  # only ISO seeds pay for the import

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=label)
    for (name, data), iso_name in zip(files.items(), _iso_names(files), strict=True):
        iso.add_fp(io.BytesIO(data), len(data), "/" + iso_name, rr_name=name, joliet_path="/" + name)
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def _iso_names(files: Mapping[str, bytes]) -> list[str]:
    """Unique 8.3 d-character names; readers use the Rock Ridge or Joliet ones."""
    out: list[str] = []
    for name in files:
        stem = re.sub(r"[^A-Z0-9_]", "", name.upper())[:8] or "FILE"
        iso_name = _ISO_NAMES.get(name, f"{stem}.;1")
        n = 0
        while iso_name in out:
            n += 1
            iso_name = f"{stem[:8 - len(str(n))]}{n}.;1"
        out.append(iso_name)
    return out


def fat_image(files: Mapping[str, bytes], label: str = FAT_LABEL) -> bytes:
    """A FAT12/16 image labelled ``label`` (upper-cased) holding ``files`` under their long names."""
    from fatfs import Partition, RamDisk  # type: ignore[import-untyped]  # only FAT seeds need it

    payload = sum(len(b) for b in files.values())
    size = max(_FAT_MIN_BYTES, (payload * 2 + 128 * 1024 + 65535) // 65536 * 65536)
    storage = bytearray(size)
    part = Partition(RamDisk(storage, sector_size=512))
    part.mkfs()
    _stamp_fat_label(storage, label)
    part.mount()
    try:
        for name, data in files.items():
            with part.open("/" + name, "w") as f:
                f.write(data)
    finally:
        part.unmount()
    return bytes(storage)


def _stamp_fat_label(storage: bytearray, label: str) -> None:
    """Set the label in the boot sector and as the root directory's first entry.

    Called on a fresh FAT12/16 volume (FatFs picks those for seed sizes), whose
    root directory is a fixed region after the FATs and still empty.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,11}", label):
        raise SpecError("a FAT label is 1-11 of A-Z, 0-9, '_', '-'", where="seed label", value=label)
    name = label.upper().ljust(11).encode("ascii")
    bytes_per_sector, _, reserved, n_fats, root_entries = struct.unpack_from("<HBHBH", storage, 11)
    fat_sectors = struct.unpack_from("<H", storage, 22)[0]
    if root_entries == 0 or fat_sectors == 0:
        raise AssertionError("FatFs made a FAT32 volume; the seed needs FAT12/16")
    storage[43:54] = name  # BS_VolLab
    root = (reserved + n_fats * fat_sectors) * bytes_per_sector
    entry = bytearray(32)
    entry[0:11] = name
    entry[11] = 0x08  # ATTR_VOLUME_ID
    storage[root:root + 32] = entry
