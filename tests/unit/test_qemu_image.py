"""The one ``qemu-img info`` reader, on images real qemu-img made."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmdriver.errors import SpecError
from vmdriver.qemu.image import MAX_CHAIN, ImageInfo, backing_chain, image_info, qemu_img_info


def qemu_img(*args: str) -> None:
    subprocess.run(("qemu-img", *args), check=True, capture_output=True)


def test_raw_image(tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"\0" * 65536)
    info = image_info(str(raw), fmt="raw")
    assert (info.format, info.virtual_size, info.backing, info.extra_files) == \
        ("raw", 65536, None, ())


def test_backing_file_as_recorded_and_as_qemu_resolves_it(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "1M")
    (tmp_path / "sub").mkdir()
    top = tmp_path / "sub" / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", str(top))
    info = image_info(str(top))
    assert info.format == "qcow2" and info.virtual_size == 1 << 20
    assert info.backing_filename == "../base.qcow2"
    assert info.backing == str(tmp_path / "sub" / ".." / "base.qcow2")
    assert info.backing_format == "qcow2"


def test_data_file_and_extents_are_extra_files(tmp_path: Path) -> None:
    qcow = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path}/d.raw", str(qcow), "1M")
    assert image_info(str(qcow)).extra_files == (f"{tmp_path}/d.raw",)
    vmdk = tmp_path / "split.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", str(vmdk),
             "1M")
    info = image_info(str(vmdk))
    assert info.extents and all(e.endswith(".vmdk") and e != str(vmdk) for e in info.extents)
    assert info.data_file is None and info.extra_files == info.extents


def test_image_given_as_an_inherited_fd(tmp_path: Path) -> None:
    qcow = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(qcow), "2M")
    fd = os.open(qcow, os.O_RDONLY)
    try:
        info = image_info(f"/dev/fd/{fd}", where="w", value="d.qcow2", pass_fds=(fd,))
    finally:
        os.close(fd)
    assert (info.filename, info.format, info.virtual_size) == (f"/dev/fd/{fd}", "qcow2", 2 << 20)


@pytest.mark.parametrize("make,fmt,match", [
    (lambda p: p.write_text("not an image"), "qcow2", "not a usable disk image: .*qcow2"),
    (lambda p: None, None, "not a usable disk image: .*No such file"),
    (lambda p: p.write_bytes(b"\0" * 512), "luks", "unsupported image format .*'luks'"),
])
def test_errors_are_one_line_and_name_the_image(tmp_path: Path, make: object, fmt: str | None,
                                                match: str) -> None:
    path = tmp_path / "x.img"
    make(path)  # type: ignore[operator]
    with pytest.raises(SpecError, match=match) as info:
        image_info(str(path), fmt=fmt, where="config.image_path")
    assert "\n" not in str(info.value) and str(info.value).startswith("config.image_path: ")


def test_raw_json_stays_available_for_callers_that_need_more(tmp_path: Path) -> None:
    qcow = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(qcow), "1M")
    data = qemu_img_info(str(qcow), fmt="qcow2", where="w", value="v")
    assert data["format"] == "qcow2" and data["format-specific"]["type"] == "qcow2"


def test_chain_is_approved_layer_by_layer_before_opening(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    mid = tmp_path / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(mid))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(top))
    asked: list[tuple[str | None, int]] = []

    def approve(image: ImageInfo, depth: int) -> str:
        asked.append((image.backing_filename, depth))
        return image.backing or ""

    chain = backing_chain(image_info(str(top)), approve)
    assert [i.filename for i in chain] == [str(top), str(mid), str(base)]
    assert asked == [("mid.qcow2", 1), (str(base), 2)]


def test_refused_backing_file_is_never_opened(tmp_path: Path) -> None:
    """approve raising stops the walk: qemu-img never runs on the refused file."""
    fifo = tmp_path / "secret"
    os.mkfifo(fifo)  # opening it would block: the test would hang if it were opened
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(fifo), "-F", "raw", str(top), "1M")

    def approve(image: ImageInfo, depth: int) -> str:
        raise SpecError("refused", value=image.backing_filename)

    with pytest.raises(SpecError, match="refused"):
        backing_chain(image_info(str(top)), approve)


def test_chain_length_is_bounded(tmp_path: Path) -> None:
    """A loop of backing files (a → b → a) ends with an error, not forever."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(b), "-F", "qcow2", str(a), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(a), "-F", "qcow2", str(b), "1M")
    with pytest.raises(SpecError, match=f"at most {MAX_CHAIN} images"):
        backing_chain(image_info(str(a)), lambda image, depth: image.backing or "")
