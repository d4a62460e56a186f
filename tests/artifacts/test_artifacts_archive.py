"""Archives: every supported kind unpacks; hostile entries are refused before any write."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import zipfile
from pathlib import Path

import pytest
import zstandard

from tests.artifacts.artifact_server import ArtifactServer
from tests.artifacts.helpers import fetch, files, leftovers, sha256
from vmdriver.errors import ArtifactError

PAYLOAD = {"disk.img": b"IMG" * 1000, "sub/readme.txt": b"hello\n"}


def _tar(entries: list[tarfile.TarInfo | tuple[str, bytes]], compression: str = "") -> bytes:
    buf = io.BytesIO()
    mode = "w:" + compression if compression in ("gz", "bz2", "xz") else "w"
    with tarfile.open(fileobj=buf, mode=mode) as tar:  # type: ignore[call-overload]
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tar.addfile(e)
            else:
                info = tarfile.TarInfo(e[0])
                info.size = len(e[1])
                tar.addfile(info, io.BytesIO(e[1]))
    data = buf.getvalue()
    return zstandard.ZstdCompressor().compress(data) if compression == "zst" else data


def _zip(entries: dict[str, bytes], attrs: dict[str, int] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (attrs or {}).get(name, 0o644) << 16
            zf.writestr(info, data)
    return buf.getvalue()


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize("suffix,compression", [
    (".tar", ""), (".tar.gz", "gz"), (".tgz", "gz"), (".tar.bz2", "bz2"), (".tar.xz", "xz"),
    (".tar.zst", "zst"),
])
def test_tar_kinds_unpack(server: ArtifactServer, tmp_path: Path, suffix: str,
                          compression: str) -> None:
    body = _tar(list(PAYLOAD.items()), compression)
    url = server.add(f"/bundle{suffix}", body)
    fetch(f"{url}?checksum={sha256(body)}", tmp_path)
    assert files(tmp_path) == ["local/disk.img", "local/sub/readme.txt"]
    assert (tmp_path / "local/disk.img").read_bytes() == PAYLOAD["disk.img"]


def test_zip_unpacks_into_destination(server: ArtifactServer, tmp_path: Path) -> None:
    url = server.add("/bundle.zip", _zip(PAYLOAD))
    fetch(url, tmp_path, destination="local/vm", mode="dir")
    assert files(tmp_path) == ["local/vm/disk.img", "local/vm/sub/readme.txt"]


@pytest.mark.parametrize("suffix,compress", [
    (".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress),
    (".zst", zstandard.ZstdCompressor().compress),
])
def test_single_compressed_file(server: ArtifactServer, tmp_path: Path, suffix: str,
                                compress: object) -> None:
    raw = b"QFI" + bytes(200_000) + b"end"
    url = server.add(f"/disk.qcow2{suffix}", compress(raw))  # type: ignore[operator]
    [out] = fetch(url, tmp_path)
    assert out == (tmp_path / "local/disk.qcow2").resolve() and out.read_bytes() == raw
    [out] = fetch(url, tmp_path / "f", mode="file", destination="local/renamed.img")
    assert out.name == "renamed.img" and out.read_bytes() == raw


def test_archive_false_keeps_the_file(server: ArtifactServer, tmp_path: Path) -> None:
    body = gzip.compress(b"x" * 100)
    url = server.add("/disk.img.gz", body)
    [out] = fetch(url + "?archive=false", tmp_path)
    assert out.name == "disk.img.gz" and out.read_bytes() == body


def test_archive_option_forces_a_kind(server: ArtifactServer, tmp_path: Path) -> None:
    url = server.add("/download", _tar(list(PAYLOAD.items()), "gz"))
    fetch(url, tmp_path, options={"archive": "tgz"})
    assert files(tmp_path) == ["local/disk.img", "local/sub/readme.txt"]


HOSTILE_TARS = {
    "dotdot": ([("../evil", b"x")], "would land outside"),
    "nested-dotdot": ([("a/../../evil", b"x")], "would land outside"),
    "absolute": ([("/tmp/evil", b"x")], "would land outside"),
    "symlink-out": ([_link("link", "../../etc")], "symlink pointing outside"),
    "symlink-abs": ([_link("link", "/etc/passwd")], "symlink pointing outside"),
    "hardlink-out": ([_link("hl", "../../etc/passwd", tarfile.LNKTYPE)], "hard link"),
    "device": ([_link("dev", "", tarfile.CHRTYPE)], "device or fifo"),
    "fifo": ([_link("fifo", "", tarfile.FIFOTYPE)], "device or fifo"),
    # A good file first: a refused archive must leave nothing, not even the good part.
    "late-escape": ([("ok.txt", b"fine"), ("../evil", b"x")], "would land outside"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TARS))
def test_hostile_tar_refused_and_nothing_left(server: ArtifactServer, tmp_path: Path,
                                              name: str) -> None:
    entries, expected = HOSTILE_TARS[name]
    url = server.add("/evil.tar.gz", _tar(entries, "gz"))  # type: ignore[arg-type]
    task = tmp_path / "alloc" / "task"
    with pytest.raises(ArtifactError) as info:
        fetch(url, task)
    assert expected in str(info.value) and str(info.value).startswith(f"artifact {url}: ")
    assert files(tmp_path) == [] and leftovers(tmp_path) == []
    assert not (tmp_path / "evil").exists() and not (tmp_path / "alloc" / "evil").exists()


@pytest.mark.parametrize("entries,attrs,expected", [
    ({"../evil": b"x"}, None, "would land outside"),
    ({"/abs/evil": b"x"}, None, "would land outside"),
    ({"C:/evil": b"x"}, None, "would land outside"),
    ({"link": b"/etc/passwd"}, {"link": 0o120777}, "symlink"),
    ({"dev": b""}, {"dev": 0o020644}, "device or fifo"),
])
def test_hostile_zip_refused(server: ArtifactServer, tmp_path: Path, entries: dict[str, bytes],
                             attrs: dict[str, int] | None, expected: str) -> None:
    url = server.add("/evil.zip", _zip({"ok.txt": b"fine", **entries}, attrs))
    with pytest.raises(ArtifactError, match=expected):
        fetch(url, tmp_path)
    assert files(tmp_path) == [] and leftovers(tmp_path) == []


def test_symlink_inside_is_fine(server: ArtifactServer, tmp_path: Path) -> None:
    url = server.add("/ok.tar", _tar([("data/disk.img", b"d"), _link("current", "data/disk.img")]))
    fetch(url, tmp_path)
    assert (tmp_path / "local/current").read_bytes() == b"d"


def test_corrupt_archive_is_one_line(server: ArtifactServer, tmp_path: Path) -> None:
    url = server.add("/broken.tar.xz", b"this is not xz at all")
    with pytest.raises(ArtifactError, match=r"cannot unpack \(tar.xz\)"):
        fetch(url, tmp_path)
    assert files(tmp_path) == [] and leftovers(tmp_path) == []


def test_destination_cannot_escape(server: ArtifactServer, tmp_path: Path) -> None:
    url = server.add("/disk.img", b"x")
    for dest in ("../outside", "/etc", "local/../../x"):
        with pytest.raises(ArtifactError, match="destination"):
            fetch(url, tmp_path / "task", destination=dest)
    (tmp_path / "task").mkdir(exist_ok=True)
    (tmp_path / "task" / "sneaky").symlink_to(tmp_path)
    with pytest.raises(ArtifactError, match="leaves the task dir"):
        fetch(url, tmp_path / "task", destination="sneaky/x")
    assert server.hits["/disk.img"] == 0
